"""Running the M3D-Bench tasks of `m3d-lit bench`: models loaded once, per-task outputs, the summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from m3d_lit.errors import InputError
from m3d_lit.evaluation.bench import HEADLINE, POOL_SIZES, TASKS, Sources, question_types

__all__ = ["ABSENT", "Runner"]

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
JUDGED = ("report", "vqa_open")


class Runner:
    """Runs one task at a time and keeps each task's summary for `write_summary`.

    Args:
        args: the parsed `m3d-lit bench` arguments.
        sources: the test records of the data found.
    """

    def __init__(self, args: argparse.Namespace, sources: Sources) -> None:
        self.args, self.sources = args, sources
        self.device = torch.device(args.device)
        self.results: dict[str, dict[str, Any]] = {}
        self._models: dict[str, tuple[torch.nn.Module, Any]] = {}

    def _model(self, which: str) -> tuple[torch.nn.Module, Any]:
        """The stage-3 LaMed (`lamed`) or stage-1 CLIP (`clip`) model and its collator, loaded once."""
        if which not in self._models:
            model, collate = self._clip() if which == "clip" else self._lamed()
            if self.device.type == "cuda":
                model.to(torch.bfloat16)
            self._models[which] = (model, collate)
        return self._models[which]

    def _lamed(self) -> tuple[torch.nn.Module, Any]:
        from m3d_lit.tasks.loading import load_task

        task, _ = load_task(self.args.checkpoint, device=str(self.device))
        if not hasattr(task.model, "generate"):
            raise InputError(
                self.args.checkpoint,
                f"holds a {type(task).__name__}, but this needs a stage-2 or stage-3 checkpoint",
            )
        return task.model, task.configure_collate()

    def _clip(self) -> tuple[torch.nn.Module, Any]:
        """`--clip-checkpoint`: a stage-1 checkpoint or an M3D-CLIP directory."""
        from m3d_lit.data.collate import make_collator
        from m3d_lit.evaluation.embed import load_clip

        loaded = load_clip(self.args.clip_checkpoint, str(self.device))
        return loaded.model, make_collator(loaded.model, max_length=loaded.max_length)

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
        from m3d_lit.data.datasets import check_paths

        check_paths(records)
        print(f"m3d-lit bench: {task} ({TASKS[task]}), {len(records)} samples", flush=True)
        predictions, metrics = (
            self._retrieval(records) if task == "retrieval" else self._scored(task, records)
        )
        self._write(task, predictions, metrics)

    def _write(self, task: str, predictions: list[dict], metrics: dict[str, Any]) -> None:
        from m3d_lit.atomic import write_json, write_jsonl

        folder = self.args.out / task
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
        from m3d_lit.data.datasets import RecordDataset

        dataset = RecordDataset(records, img_size=img_size)
        return DataLoader(dataset, batch_size=self.args.batch_size, collate_fn=collate)

    @torch.no_grad()
    def _retrieval(self, records: list) -> tuple[list[dict], dict[str, Any]]:
        from m3d_lit.evaluation.bench_scores import retrieval_metrics

        model, collate = self._model("clip")
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
        from m3d_lit.data.collate import make_collator
        from m3d_lit.evaluation.evaluate import generate_records

        model, _ = self._model("lamed")
        size = tuple(model.img_size)
        collate = make_collator(model, generation=True)
        loader = self._loader(records, collate, size)
        predictions = list(generate_records(model, loader, self.args.max_new_tokens, self.device))
        metrics = self._score(task, records, predictions)
        if task in JUDGED and self.args.judge is not None:
            self._judge(predictions, metrics)
        return predictions, metrics

    def _score(self, task: str, records: list, predictions: list[dict]) -> dict[str, Any]:
        from m3d_lit.evaluation import bench_scores as scores
        from m3d_lit.evaluation.metrics import compute_metrics

        if task == "vqa_closed":
            types: dict[str, str] = {}
            for source in sorted({Path(r.source) for r in records}):
                types.update(question_types(source))
            for prediction in predictions:
                prediction["question_type"] = types.get(prediction["id"], "?")
            return scores.choice_metrics(predictions, types)
        if task == "rec":
            metrics, ious = scores.rec_scores(predictions)
            for prediction, iou in zip(predictions, ious):
                prediction["box_iou"] = iou
            return metrics
        if task == "seg":
            return scores.seg_metrics(predictions, group=lambda r: r["id"].split("/", 3)[3])
        if task == "refseg":
            return scores.seg_metrics(predictions)
        # each task is one kind of record: its text metrics cover all of them
        metrics = compute_metrics(predictions, self.args.protocol, separate=(), **self.args.scoring)
        if task == "reg":
            metrics.update(scores.reg_name_metrics(predictions))
        return metrics

    def _judge(self, predictions: list[dict], metrics: dict[str, Any]) -> None:
        from m3d_lit.evaluation.judge import judge

        result = judge(predictions, self.args.judge, batch_size=self.args.batch_size, device=self.device)
        metrics.update({k: result[k] for k in ("judge_mean", "judge_n", "judge_unparsable")})
        for prediction, score, reply in zip(predictions, result["scores"], result["replies"]):
            prediction.update({"judge_score": score, "judge_reply": reply})

    def write_summary(self, tasks: list[str]) -> None:
        """OUT/metrics.json (setup + every task's status and headline figures) and OUT/report.md."""
        from m3d_lit.atomic import atomic_path, write_json

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
        self.args.out.mkdir(parents=True, exist_ok=True)
        write_json(self.args.out / "metrics.json", summary)
        with atomic_path(self.args.out / "report.md") as tmp:
            tmp.write_text("\n".join(report_lines(summary)) + "\n", encoding="utf-8")


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
