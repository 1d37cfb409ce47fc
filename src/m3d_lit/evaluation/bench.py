"""M3D-Bench's eight tasks (`m3d-lit bench`): the tasks, where their test records come from, the report.

`find_data` sorts the data folders into M3D-Data and brain CT, `Sources` reads each task's test
records through the DataModules, `report_lines` writes the summary table; running the models is
`m3d_lit.commands.bench`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3d_lit.data import datamodules as dm
from m3d_lit.errors import InputError

__all__ = [
    "ABSENT",
    "HEADLINE",
    "POOL_SIZES",
    "TASKS",
    "BenchData",
    "Sources",
    "find_data",
    "question_types",
    "report_lines",
]

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
HEADLINE = {
    "report": ("bleu1", "bleu4", "rougeL", "meteor", "judge_mean"),
    "vqa_open": ("bleu1", "rougeL", "meteor", "judge_mean"),
    "vqa_closed": ("accuracy",),
    "rec": ("rec_iou", "rec_acc@0.5"),
    "reg": ("bleu1", "rougeL", "meteor", "reg_name_acc"),
    "seg": ("dice", "dice_class_mean"),
    "refseg": ("dice", "negative_seg_rate"),
}
ABSENT = {
    "retrieval": "no M3D-Cap test split (M3D_Cap_npy/M3D_Cap.json) and no brain-CT test reports (reports.jsonl)",
    "report": "no M3D-Cap test split (M3D_Cap_npy/M3D_Cap.json) and no brain-CT test reports (reports.jsonl)",
    "vqa_closed": "no M3D-VQA test CSV (M3D_VQA/M3D_VQA_test.csv)",
    "vqa_open": "no M3D-VQA test CSV and no brain-CT open questions (qa_test.jsonl)",
    "rec": "no non-empty test mask (M3D_Seg_npy test split, PhysioNet qa_test.jsonl seg rows)",
    "reg": "no non-empty test mask (M3D_Seg_npy test split, PhysioNet qa_test.jsonl seg rows)",
    "seg": "no M3D-Seg test split (M3D_Seg_npy/<dataset>/<dataset>.json)",
    "refseg": "no brain-CT segmentation questions (PhysioNet qa_test.jsonl seg rows)",
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


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _results(task: str, entry: dict[str, Any], protocol: str) -> str:
    if entry["status"] != "ok":
        return entry["reason"].replace("|", "/").replace("\n", " ")
    if task == "retrieval":
        parts = []
        for key, pool in entry["headline"].items():
            size = f" (capped at {pool['size']})" if pool["capped"] else ""
            recalls = ", ".join(f"{k.replace('_', ' ')} {_cell(v)}" for k, v in pool.items() if "_R@" in k)
            parts.append(f"pool {key.removeprefix('pool_')}{size}: {recalls}")
        return "; ".join(parts)
    text = ("bleu", "rouge", "meteor", "bertscore")
    return ", ".join(
        f"{k} ({protocol}) {_cell(v)}" if k.startswith(text) else f"{k} {_cell(v)}"
        for k, v in entry["headline"].items()
    )


def report_lines(summary: dict[str, Any]) -> list[str]:
    """report.md: the setup, then one row per task with its status and headline figures."""
    setup = summary["setup"]
    lines = [
        "# M3D-Bench",
        "",
        f"Checkpoint `{setup['checkpoint']}`; CLIP checkpoint `{setup['clip_checkpoint']}`; "
        f"M3D-Data `{setup['m3d_data']}`; brain CT {', '.join(f'`{p}`' for p in setup['brainct']) or '-'}; "
        f"judge `{setup['judge']}`; "
        + (f"at most {setup['limit']} samples per task." if setup["limit"] else "every test sample."),
        "",
        "| # | task | status | n | data | results |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = list(TASKS)
    for task, entry in summary["tasks"].items():
        data = ", ".join(entry.get("datasets", [])) or "-"
        row = [str(names.index(task) + 1), entry["title"], entry["status"], _cell(entry.get("n")), data]
        lines.append("| " + " | ".join(row + [_results(task, entry, setup["protocol"])]) + " |")
    lines += [
        "",
        f"Retrieval: recall@k both ways over the first min(pool, available) test pairs, pools {setup['pool_sizes']};"
        " a pool smaller than asked is marked capped (recall@k with k >= pool size is 1 by definition).",
        f"Text metrics under the `{setup['protocol']}` protocol, as in `m3d-lit eval`'s report; closed VQA: the chosen letter (or the one choice named)"
        " against the reference, by question type in vqa_closed/metrics.json; REC: IoU of the first box;"
        " Dice over samples with a non-empty mask (negative_seg_rate: [SEG] produced where there is nothing).",
        "Each task's predictions.jsonl and full metrics.json are in its folder.",
    ]
    return lines
