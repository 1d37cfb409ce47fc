"""`m3d-lit predict`: answer a file of requests (a scan and a question per row) in batches, resumably.

    m3d-lit predict --checkpoint runs/stage3 --input requests.csv --out predictions.jsonl
                    [--batch-size 8] [--source NAME] [--max-new-tokens 64] [--device cpu|cuda]
                    [--dtype auto|float32|bfloat16|float64]

`--input` is a CSV with the header `scan,question` or a `.jsonl` with those keys; `scan` is a NIfTI file,
a DICOM series folder or an `.npy` volume at the model's size, relative paths starting from the request
file's folder. Each scan is read once, as the model's training data were read (its size and CT window),
and its questions are answered together. Each line of `--out` holds the request's `line`, `scan` and
`question` with the `answer`, `p_yes` for a closed (yes/no) question and, when the answer segments,
`mask_file`: a NIfTI in the scan's own geometry under `<out>_masks/`. Lines are added as answers come,
so a rerun skips the rows already written. A row that cannot be answered (a missing scan, an empty
question, an unreadable scan) is listed with its line number and the others are answered; the exit status
is 0 when every row was answered, 1 when some could not be, 2 when none could.

`m3d-lit predict -c stage3 --ckpt_path CKPT [--data ...]` (with a recipe given by `-c`/`--config`) is
LightningCLI's predict instead: the task's `predict_step` answers the DataModule's test split through the
same Predictor and writes `predictions.jsonl` into the run's log folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from m3d_lit.atomic import write_jsonl
from m3d_lit.commands.arguments import CommandParser, answering_checkpoint_option, inference_options
from m3d_lit.errors import InputError
from m3d_lit.inference.predictor import Prediction, Predictor, Request
from m3d_lit.inference.requests import RequestRow, read_request_file
from m3d_lit.jsonl import read_jsonl

__all__ = ["main"]


def _done(out: Path) -> set[tuple[int, str, str]]:
    """(line, scan, question) of the requests `out` already answers. A last line cut short by a killed
    run is dropped (rewritten without it); a bad line elsewhere means `out` is not this command's."""
    if not out.exists():
        return set()
    bad: list[tuple[int, str]] = []
    kept = list(read_jsonl(out, bad))
    last = max([n for n, _ in kept] + [n for n, _ in bad], default=0)
    if [n for n, _ in bad if n != last]:
        raise InputError(
            out, f"line {bad[0][0]} {bad[0][1]}: not an output of m3d-lit predict; choose another --out"
        )
    if bad:
        write_jsonl(out, [obj for _, obj in kept])
    try:
        return {(int(obj["line"]), str(obj["scan"]), str(obj["question"])) for _, obj in kept}
    except (KeyError, TypeError, ValueError):
        raise InputError(
            out, "holds lines without line, scan and question: not an output of m3d-lit predict"
        ) from None


def _requests(predictor: Predictor, rows: list[RequestRow], source: str | None,
              bad: list[tuple[int, str]]) -> Iterator[Request]:  # fmt: skip
    """A request per row, each scan read once (its rows in a row, so its visual tokens are shared)."""
    by_scan: dict[Path, list[RequestRow]] = {}
    for row in rows:
        by_scan.setdefault(row.path, []).append(row)
    for path, questions in by_scan.items():
        try:
            prepared = predictor.read_scan(path, source)
        except InputError as err:
            bad.extend((row.line, f"scan {row.scan}: {err.problem}") for row in questions)
            continue
        size = tuple(int(n) for n in prepared.orig_shape)
        if path.name.lower().endswith(".npy") and size != predictor.img_size:
            # an .npy holds a prepared volume, not a scan: resizing it would answer about other pixels
            problem = f"is an .npy of size {list(size)}; the model takes {list(predictor.img_size)}"
            bad.extend((row.line, f"scan {row.scan} {problem}") for row in questions)
            continue
        for row in questions:
            yield predictor.request(prepared, row.question, id=str(row.line), extra={"row": row})


def _line(prediction: Prediction, masks: Path) -> dict[str, Any]:
    row: RequestRow = prediction.request.extra["row"]
    line: dict[str, Any] = {"line": row.line, "scan": row.scan, "question": row.question,
                            "answer": prediction.text}  # fmt: skip
    if prediction.p_yes is not None:
        line["p_yes"] = prediction.p_yes
    if prediction.seg_logits is not None:
        masks.mkdir(parents=True, exist_ok=True)
        path = masks / f"line{row.line}.nii.gz"
        prediction.write_mask(path)
        line["mask_file"] = f"{masks.name}/{path.name}"
    return line


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="m3d-lit predict",
        description=__doc__.split("\n\n")[0],
        epilog="With a recipe (-c/--config) this is LightningCLI's predict over a DataModule's test split, "
        "through the tasks' predict_step: m3d-lit predict -c stage3 --ckpt_path CKPT [--data ...] "
        "(its options: m3d-lit predict -c stage3 --help).",
    )
    answering_checkpoint_option(parser)
    parser.add_argument(
        "--input", required=True, type=Path, help="requests: a .csv (scan,question) or .jsonl"
    )
    parser.add_argument("--out", required=True, type=Path, help="predictions .jsonl (extended by a rerun)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions answered together")
    parser.add_argument(
        "--source",
        help="the training source the scans are like, when its windows differ (default: "
        "the window all the model's training sources share)",
    )
    inference_options(parser)
    args = parser.parse_args(argv)
    for option, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise InputError(option, f"{value} must be at least 1")
    rows, bad = read_request_file(args.input)
    done = _done(args.out)
    todo = [r for r in rows if (r.line, r.scan, r.question) not in done]
    if rows and not todo:
        print(f"m3d-lit predict: every request of {args.input} is already in {args.out}")
    answered = 0
    if todo:
        predictor = Predictor.load(args.checkpoint, args.device, args.dtype, args.max_new_tokens)
        for note in predictor.loaded.notes:
            print(f"m3d-lit predict: {note}", file=sys.stderr)
        masks = args.out.with_name(args.out.name.removesuffix(".jsonl") + "_masks")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as handle, tqdm(total=len(todo), unit="request") as bar:
            for prediction in predictor.predict(
                _requests(predictor, todo, args.source, bad), args.batch_size
            ):
                handle.write(json.dumps(_line(prediction, masks), ensure_ascii=False) + "\n")
                handle.flush()  # a killed run keeps every answer written so far
                answered += 1
                bar.update(1)
    for line, problem in sorted(bad):
        print(f"m3d-lit predict: {args.input}: line {line} {problem} (not answered)", file=sys.stderr)
    print(f"m3d-lit predict: {answered} answered, {len(rows) - len(todo)} already in {args.out}, "
          f"{len(bad)} not answerable")  # fmt: skip
    if bad:
        return 2 if not answered and not (len(rows) - len(todo)) else 1
    return 0
