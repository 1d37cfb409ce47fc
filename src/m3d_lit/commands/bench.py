"""`m3d-lit bench`: the eight M3D-Bench tasks over the test splits of the data found, in one command.

    m3d-lit bench --checkpoint runs/stage3 [--clip-checkpoint runs/stage1]
                  [--tasks all|retrieval,report,...|1,2,...] --out eval/bench [--overwrite]
                  [--data data/M3D-Data data/cq500 data/physionet] [--judge /models/judge] [--limit N]
                  [--protocol m3d|corpus] [--bootstrap 1000] [--seed 0] [--bertscore-model DIR]

`--data` folders are M3D-Data folders (`M3D_Cap_npy/`, `M3D_VQA/`, `M3D_Seg_npy/`, as `m3d-lit synth
--m3d-data` writes them) or `m3d-lit prepare` outputs (`qa_test.jsonl`, `reports.jsonl`). The tasks:

1. retrieval: image <-> report recall@1/5/10 with the stage-1 (CLIP) model, pools of 100 and 1000 pairs
   (the first pairs of M3D-Cap test, then brain-CT test reports; capped at the count available);
2. report: report generation on the same pairs: BLEU, ROUGE, METEOR (+ the LLM judge with `--judge`);
3. vqa_closed: M3D-VQA multiple choice: accuracy overall and by question type;
4. vqa_open: M3D-VQA free answers and brain-CT open questions: text metrics (+ judge);
5. rec: referring expression comprehension (box from M3D-Seg and PhysioNet masks): IoU, accuracy@0.5;
6. reg: referring expression generation (name the boxed structure): text metrics, naming accuracy;
7. seg: semantic segmentation (M3D-Seg class prompts): Dice per class;
8. refseg: referring expression segmentation (brain-CT free-text segmentation requests): Dice.

Each task writes OUT/<task>/predictions.jsonl and metrics.json; OUT/metrics.json and OUT/report.md sum
them up. A task with no data is listed as absent; a bad input file ends the run (exit 2) after the report
of what ran. An OUT holding an earlier result is refused; `--overwrite` replaces it whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from m3d_lit.atomic import atomic_folder, atomic_path, write_json, write_jsonl
from m3d_lit.commands.arguments import CommandParser, check_out_folder, inference_options
from m3d_lit.commands.score import add_protocol_options, protocol_options
from m3d_lit.data.collate import make_collator
from m3d_lit.data.datasets import RecordDataset, check_paths
from m3d_lit.errors import InputError
from m3d_lit.evaluation.bench import (
    ABSENT,
    HEADLINE,
    POOL_SIZES,
    TASKS,
    Sources,
    find_data,
    question_types,
    report_lines,
)
from m3d_lit.evaluation.choice import choice_metrics
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.judge import judge
from m3d_lit.evaluation.referring import rec_scores, reg_name_metrics
from m3d_lit.evaluation.retrieval import retrieval_metrics
from m3d_lit.evaluation.segmentation import seg_metrics
from m3d_lit.inference.loading import load_model
from m3d_lit.inference.predictor import Predictor, inference_dtype
from m3d_lit.inference.records import prediction_records

__all__ = ["DEFAULT_DATA", "Runner", "main", "parse_tasks"]

DEFAULT_DATA = ("data/M3D-Data", "data/cq500", "data/physionet")
JUDGED = ("report", "vqa_open")


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="stage-3 (or stage-2) checkpoint for tasks 2-8 "
        "(default: none given, those tasks are recorded as absent)",
    )
    ap.add_argument(
        "--clip-checkpoint",
        type=Path,
        help="stage-1 (CLIP) checkpoint for retrieval (default: none given, retrieval is recorded as absent)",
    )
    ap.add_argument("--tasks", default="all", help=f"all, or names/numbers: {','.join(TASKS)}")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    ap.add_argument(
        "--data", type=Path, nargs="+", help=f"data folders (default: those of {DEFAULT_DATA} that exist)"
    )
    ap.add_argument(
        "--judge",
        type=Path,
        help="local Hugging Face causal LM that scores reports and open answers (default: no judge, "
        "the text metrics only)",
    )
    ap.add_argument("--batch-size", type=int, default=8, help="questions answered together")
    ap.add_argument("--limit", type=int, help="only the first N samples of each task (default: all)")
    inference_options(ap)
    add_protocol_options(ap)
    return ap


def parse_tasks(text: str) -> list[str]:
    """`all` or comma-separated names or 1-based numbers -> task names in bench order."""
    names = list(TASKS)
    if text.strip() == "all":
        return names
    chosen = set()
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.isdigit() and 1 <= int(item) <= len(names):
            chosen.add(names[int(item) - 1])
        elif item in TASKS:
            chosen.add(item)
        else:
            raise InputError(
                "--tasks", f"unknown task {item!r}; choose all or from {names} (or 1-{len(names)})"
            )
    if not chosen:
        raise InputError("--tasks", "names no task")
    return [n for n in names if n in chosen]


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit bench`."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.scoring = protocol_options(parser, args)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise InputError(
            "--batch-size/--max-new-tokens/--limit",
            f"{args.batch_size}, {args.max_new_tokens} and {args.limit} must be >= 1",
        )
    tasks = parse_tasks(args.tasks)
    explicit = args.data is not None
    data = find_data(list(args.data) if explicit else [Path(p) for p in DEFAULT_DATA], explicit)
    check_out_folder(args.out, args.overwrite, ("metrics.json", "report.md", *TASKS))
    failure = None
    with atomic_folder(args.out) as out:
        runner = Runner(args, Sources(data), out)
        for task in tasks:
            try:
                runner.run(task)
            except InputError as err:
                runner.fail(task, str(err))
                failure = failure or err
        runner.write_summary(tasks)
    print(f"m3d-lit bench: wrote {args.out / 'report.md'} and {args.out / 'metrics.json'}")
    if failure is not None:
        print(f"m3d-lit bench: error: {failure}", file=sys.stderr)
        return 2
    return 0


class Runner:
    """Runs one task at a time and keeps each task's summary for `write_summary`.

    Args:
        args: the parsed `m3d-lit bench` arguments.
        sources: the test records of the data found.
    """

    def __init__(self, args: argparse.Namespace, sources: Sources, out: Path) -> None:
        self.args, self.sources, self.out = args, sources, out
        self.device = torch.device(args.device)
        self.results: dict[str, dict[str, Any]] = {}
        self._predictor: Predictor | None = None
        self._clip: tuple[torch.nn.Module, Any] | None = None

    def _lamed(self) -> Predictor:
        """The stage-2/3 model (tasks 2-8), loaded once."""
        if self._predictor is None:
            args = self.args
            self._predictor = Predictor.load(args.checkpoint, args.device, args.dtype, args.max_new_tokens)
        return self._predictor

    def _clip_model(self) -> tuple[torch.nn.Module, Any]:
        """`--clip-checkpoint` (stage-1 checkpoint or M3D-CLIP directory) and its collator, loaded once."""
        if self._clip is None:
            loaded = load_model(self.args.clip_checkpoint, kind="clip", device=self.device)
            model = loaded.model.to(inference_dtype(self.device, self.args.dtype))
            max_length = loaded.bundle.text_max_length or model.max_length
            self._clip = (model, make_collator(model, max_length=max_length))
        return self._clip

    def fail(self, task: str, message: str) -> None:
        self.results[task] = {"status": "failed", "reason": message}

    def run(self, task: str) -> None:
        """Run one task and write OUT/<task>/predictions.jsonl and metrics.json (or record it as absent)."""
        checkpoint = self.args.clip_checkpoint if task == "retrieval" else self.args.checkpoint
        if checkpoint is None:
            flag = "--clip-checkpoint" if task == "retrieval" else "--checkpoint"
            self.results[task] = {"status": "absent", "reason": f"no {flag} given"}
            return
        records = self.sources.records(task)
        if not records:
            self.results[task] = {"status": "absent", "reason": ABSENT[task]}
            return
        if self.args.limit is not None:
            records = records[: self.args.limit]
        check_paths(records)
        print(f"m3d-lit bench: {task} ({TASKS[task]}), {len(records)} samples", flush=True)
        predictions, metrics = (
            self._retrieval(records) if task == "retrieval" else self._scored(task, records)
        )
        self._write(task, predictions, metrics)

    def _write(self, task: str, predictions: list[dict], metrics: dict[str, Any]) -> None:
        folder = self.out / task
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "predictions.jsonl", predictions)
        write_json(folder / "metrics.json", metrics)
        if task == "retrieval":
            headline = {key: value for key, value in metrics.items() if key.startswith("pool_")}
        else:
            headline = {key: metrics.get(key) for key in HEADLINE[task] if key in metrics}
        datasets = sorted({str(p.get("dataset")) for p in predictions})
        self.results[task] = {
            "status": "ok",
            "n": len(predictions),
            "datasets": datasets,
            "headline": headline,
        }

    def _loader(self, records: list, collate: Any, img_size: Any) -> DataLoader:
        dataset = RecordDataset(records, img_size=img_size)
        return DataLoader(dataset, batch_size=self.args.batch_size, collate_fn=collate)

    @torch.no_grad()
    def _retrieval(self, records: list) -> tuple[list[dict], dict[str, Any]]:
        model, collate = self._clip_model()
        dtype = next(model.parameters()).dtype
        images, texts, rows = [], [], []
        # Pairs past the largest pool are never compared, so they are not embedded either.
        for batch in self._loader(records[: max(POOL_SIZES)], collate, model.img_size):
            image, text, _ = model(
                batch["images"].to(self.device, dtype),
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
            )
            images.append(image.float().cpu())
            texts.append(text.float().cpu())
            rows += [
                {"id": i, "dataset": d, "text": a}
                for i, d, a in zip(batch["ids"], batch["datasets"], batch["answers"])
            ]
        metrics, i2t, t2i = retrieval_metrics(torch.cat(images), torch.cat(texts), POOL_SIZES)
        metrics["order"] = "the first pairs of the test split(s), M3D-Cap first; ties count as hits"
        for row, a, b in zip(rows, i2t.tolist(), t2i.tolist()):
            row.update({"i2t_rank": a, "t2i_rank": b})
        return rows, metrics

    def _scored(self, task: str, records: list) -> tuple[list[dict], dict[str, Any]]:
        predictor = self._lamed()
        dataset = RecordDataset(records, img_size=predictor.img_size)
        predictions = list(prediction_records(predictor, dataset, self.args.batch_size))
        metrics = self._score(task, records, predictions)
        if task in JUDGED and self.args.judge is not None:
            self._judge(predictions, metrics)
        return predictions, metrics

    def _score(self, task: str, records: list, predictions: list[dict]) -> dict[str, Any]:
        if task == "vqa_closed":
            types: dict[str, str] = {}
            for source in sorted({Path(r.source) for r in records}):
                types.update(question_types(source))
            for prediction in predictions:
                prediction["question_type"] = types.get(prediction["id"], "?")
            return choice_metrics(predictions, types)
        if task == "rec":
            metrics, ious = rec_scores(predictions)
            for prediction, iou in zip(predictions, ious):
                prediction["box_iou"] = iou
            return metrics
        if task == "seg":
            return seg_metrics(predictions, group=lambda r: r["id"].split("/", 3)[3])
        if task == "refseg":
            return seg_metrics(predictions)
        # each task is one kind of record: its text metrics cover all of them
        metrics = compute_metrics(predictions, self.args.protocol, separate=(), **self.args.scoring)
        if task == "reg":
            metrics.update(reg_name_metrics(predictions))
        return metrics

    def _judge(self, predictions: list[dict], metrics: dict[str, Any]) -> None:
        result = judge(predictions, self.args.judge, batch_size=self.args.batch_size, device=self.device)
        metrics.update({k: result[k] for k in ("judge_mean", "judge_n", "judge_unparsable")})
        for prediction, score, reply in zip(predictions, result["scores"], result["replies"]):
            prediction.update({"judge_score": score, "judge_reply": reply})

    def write_summary(self, tasks: list[str]) -> None:
        """OUT/metrics.json (setup + every task's status and headline figures) and OUT/report.md."""
        setup = {
            "checkpoint": None if self.args.checkpoint is None else str(self.args.checkpoint),
            "clip_checkpoint": None if self.args.clip_checkpoint is None else str(self.args.clip_checkpoint),
            "m3d_data": None if self.sources.data.m3d is None else str(self.sources.data.m3d),
            "brainct": [str(p) for p in self.sources.data.brainct],
            "judge": None if self.args.judge is None else str(self.args.judge),
            "limit": self.args.limit,
            "max_new_tokens": self.args.max_new_tokens,
            "pool_sizes": list(POOL_SIZES),
            "protocol": self.args.protocol,
        }
        summary = {"setup": setup, "tasks": {t: {"title": TASKS[t], **self.results[t]} for t in tasks}}
        write_json(self.out / "metrics.json", summary)
        with atomic_path(self.out / "report.md") as tmp:
            tmp.write_text("\n".join(report_lines(summary)) + "\n", encoding="utf-8")
