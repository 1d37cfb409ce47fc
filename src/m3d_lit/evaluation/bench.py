"""`m3d-lit bench`: the eight M3D-Bench tasks over the test splits of the data found, in one command.

    m3d-lit bench --checkpoint checkpoints/stage3/last.ckpt [--clip-checkpoint checkpoints/stage1/last.ckpt]
                  [--tasks all|retrieval,report,...|1,2,...] --out runs/bench
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
of what ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m3d_lit.arguments import CommandParser
from m3d_lit.errors import InputError
from m3d_lit.evaluation.score import add_protocol_options, protocol_options

__all__ = ["POOL_SIZES", "TASKS", "BenchData", "find_data", "main"]

TASKS = {
    "retrieval": "image-text retrieval",
    "report": "report generation",
    "vqa_closed": "closed-ended VQA",
    "vqa_open": "open-ended VQA",
    "rec": "referring expression comprehension",
    "reg": "referring expression generation",
    "seg": "semantic segmentation",
    "refseg": "referring expression segmentation",
}
POOL_SIZES = (100, 1000)
DEFAULT_DATA = ("data/M3D-Data", "data/cq500", "data/physionet")
HEADLINE = {
    "report": ("bleu1", "bleu4", "rougeL", "meteor", "judge_mean"),
    "vqa_open": ("bleu1", "rougeL", "meteor", "judge_mean"),
    "vqa_closed": ("accuracy",),
    "rec": ("rec_iou", "rec_acc@0.5"),
    "reg": ("bleu1", "rougeL", "meteor", "reg_name_acc"),
    "seg": ("dice", "dice_class_mean"),
    "refseg": ("dice", "negative_seg_rate"),
}


@dataclass
class BenchData:
    """The data folders of a run: at most one M3D-Data folder and any number of brain-CT folders."""

    m3d: Path | None = None
    brainct: list[Path] = field(default_factory=list)


def find_data(paths: list[Path], explicit: bool) -> BenchData:
    """Sort folders into M3D-Data and brain-CT; a folder given explicitly must exist and be one of them."""
    data = BenchData()
    for path in paths:
        if not path.is_dir():
            if explicit:
                raise InputError(path, "data folder not found")
            continue
        if any((path / sub).is_dir() for sub in ("M3D_Cap_npy", "M3D_VQA", "M3D_Seg_npy")):
            if data.m3d is not None:
                raise InputError(path, f"a second M3D-Data folder (the first: {data.m3d}); give one")
            data.m3d = path
        elif (path / "qa_test.jsonl").is_file() or (path / "reports.jsonl").is_file():
            data.brainct.append(path)
        else:
            raise InputError(
                path, "is neither M3D-Data (M3D_Cap_npy/, M3D_VQA/, M3D_Seg_npy/) nor a `m3d-lit prepare` "
                "output (qa_test.jsonl, reports.jsonl)"
            )  # fmt: skip
    return data


def _seg_datasets(root: Path) -> list[str]:
    """M3D-Seg dataset folders under `root` whose JSON has a test split."""
    names = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        spec = folder / f"{folder.name}.json"
        if spec.is_file():
            try:
                content = json.loads(spec.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise InputError(spec, f"is not JSON: {err.msg}") from err
            if isinstance(content, dict) and isinstance(content.get("test"), list):
                names.append(folder.name)
    return names


class Sources:
    """The test records of each source, read once through the DataModules (positioning rows included).

    Args:
        data: the data folders found.
    """

    def __init__(self, data: BenchData) -> None:
        self.data = data
        self._cache: dict[str, list] = {}

    def _module(self, part: str) -> Any:
        """The DataModule that reads `part`, or None when its files are absent."""
        from m3d_lit.data import datamodules as dm

        root, brainct = self.data.m3d, self.data.brainct
        if part in ("qa", "report"):
            file = "qa_test.jsonl" if part == "qa" else "reports.jsonl"
            roots = [str(r) for r in brainct if (r / file).is_file()]
            return dm.BrainCTQADataModule(roots, mode=part, positioning=part == "qa") if roots else None
        if root is None:
            return None
        cap, vqa, seg = (
            root / "M3D_Cap_npy" / "M3D_Cap.json",
            root / "M3D_VQA" / "M3D_VQA_test.csv",
            root / "M3D_Seg_npy",
        )
        if part == "cap":
            return dm.M3DCapDataModule(str(root), str(cap), val_split=None) if cap.is_file() else None
        if part in ("vqa_closed", "vqa_open"):
            mode = part.removeprefix("vqa_")
            return dm.M3DVQADataModule(str(root), test_csv=str(vqa), mode=mode) if vqa.is_file() else None
        names = _seg_datasets(seg) if seg.is_dir() else []
        return dm.M3DSegDataModule(str(seg), names, positioning=True) if names else None

    def read(self, part: str) -> list:
        """Test records of `cap`, `vqa_closed`, `vqa_open`, `seg` (M3D-Data), `qa` or `report` (brain CT)."""
        if part not in self._cache:
            module = self._module(part)
            self._cache[part] = [] if module is None else module.read_split("test") or []
        return self._cache[part]

    def records(self, task: str) -> list:
        """The test records of one task, in a fixed order (M3D-Data first)."""

        def kind(records: list, *kinds: str) -> list:
            return [r for r in records if r.kind in kinds]

        if task in ("retrieval", "report"):
            return self.read("cap") + self.read("report")
        if task == "vqa_closed":
            return self.read("vqa_closed")
        if task == "vqa_open":
            return self.read("vqa_open") + kind(self.read("qa"), "open")
        if task in ("rec", "reg"):
            return kind(self.read("seg") + self.read("qa"), task)
        if task == "seg":
            return kind(self.read("seg"), "seg")
        return kind(self.read("qa"), "seg")


def question_types(csv_path: Path) -> dict[str, str]:
    """Record id (as `read_m3d_vqa` names rows) -> the row's `Question Type`."""
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return {
            f"{csv_path.stem}/{reader.line_num}": (row.get("Question Type") or "?").strip() for row in reader
        }


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="stage-3 (or stage-2) checkpoint for tasks 2-8")
    ap.add_argument("--clip-checkpoint", type=Path, help="stage-1 (CLIP) checkpoint for retrieval")
    ap.add_argument("--tasks", default="all", help=f"all, or names/numbers: {','.join(TASKS)}")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument(
        "--data", type=Path, nargs="+", help=f"data folders (default: those of {DEFAULT_DATA} that exist)"
    )
    ap.add_argument(
        "--judge", type=Path, help="local Hugging Face causal LM that scores reports and open answers"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int, help="only the first N samples of each task")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    from m3d_lit.evaluation.bench_run import Runner

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
    runner = Runner(args, Sources(data))
    failure = None
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
