"""Training from streaming chunks through the real CLI and Trainer (CPU, gloo): one epoch on two ranks trains
on every row once; a run killed with SIGKILL and resumed on another number of ranks continues the row
stream where its checkpoint left it (nothing repeated, nothing skipped); with shuffling off the float64
losses equal the file-based module's; and every stage logs its throughput to TensorBoard."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLIP, LAMED, REPO, TESTS, write_prepared

from m3d_lit.cli import main
from m3d_lit.data.datamodules import BrainCTQADataModule
from m3d_lit.data.streaming import StreamingDataModule
from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint

STAGES = {1: "stage1_clip", 2: "stage2_align", 3: "stage3_finetune"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Prepared folders (4 scans per split each: 8 + 12 QA rows, 4 + 4 reports per split) and their chunks."""
    root = tmp_path_factory.mktemp("stream")
    prepared = [str(write_prepared(root / "prepared" / n, n, n_per_split=4)) for n in ("cq500", "physionet")]
    assert main(["optimize", *prepared, "--out", str(root / "chunks")]) == 0
    return {"prepared": prepared, "chunks": [str(root / "chunks" / n) for n in ("cq500", "physionet")]}


def _argv(stage: int, chunks: list[str], overlay: Path, *extra: str) -> list[str]:
    overrides = CLIP if stage == 1 else LAMED
    model = ["--model.text_max_length", "32"] if stage == 1 else ["--model.init_from", "null"]
    return [
        "fit", "-c", f"stage{stage}", "-c", "cpu", "-c", str(overlay),
        "--model.preset", "tiny", "--model.overrides", json.dumps(overrides), *model,
        "--data", "streaming", "--data.input_dirs", json.dumps(chunks), "--data.num_workers", "0",
        "--data.mode", "qa" if stage == 3 else "report", "--data.batch_size", "2", *extra,
    ]  # fmt: skip


def _overlay(folder: Path, name: str, log: Path, kill_at: int | None = None, every: int = 2) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder / "ckpt"), "every_n_train_steps": every, "save_top_k": 0,
                       "save_last": True}},
        {"class_path": "stream_log.RowLog", "init_args": {"path": str(log)}},
    ]  # fmt: skip
    if kill_at is not None:
        callbacks.append({"class_path": "kill_switch.KillAtStep", "init_args": {"step": kill_at}})
    trainer = {"logger": False, "limit_val_batches": 0, "enable_progress_bar": False, "callbacks": callbacks,
               "log_every_n_steps": 1}  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"trainer": trainer}))
    return path


def _rows(log: Path, up_to: int | None = None) -> list[str]:
    """The logged ids in stream order (step, then rank), of the steps up to `up_to`."""
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines = [x for x in lines if up_to is None or x["step"] <= up_to]
    return [i for x in sorted(lines, key=lambda x: (x["step"], x["rank"])) for i in x["rows"]]


def _stream(chunks: list[str], count: int) -> list[str]:
    """The first `count` rows (id | question) of the training stream of the recipe's settings (seed 0)."""
    data = StreamingDataModule(chunks, mode="qa", batch_size=2)
    data.setup("fit")
    data.set_collator(list)
    plans = data.train_dataloader().sampler.plans
    samples = [data.datasets["train"][plans.key(p)] for p in range(count)]
    return [f"{s['id']} | {s['question']}" for s in samples]


@pytest.mark.slow
def test_two_ranks_train_one_epoch_on_every_row_once(sources, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "rows.jsonl"
    overlay = _overlay(tmp_path, "epoch", log)
    devices = ["--trainer.devices", "2", "--trainer.strategy", "ddp_fork", "--trainer.max_epochs", "1"]
    assert main(_argv(3, sources["chunks"], overlay, *devices)) == 0
    rows = _rows(log)
    modules = [BrainCTQADataModule([root]) for root in sources["prepared"]]
    qa = [f"{r.id} | {r.question[0]}" for m in modules for r in m.read_split("train")]
    assert len(rows) == len(set(rows)) == 20 and sorted(rows) == sorted(qa)  # 5 steps x 2 ranks x 2 rows
    assert rows == _stream(sources["chunks"], 20) and rows != qa  # the plan's order, shuffled


@pytest.mark.slow
def test_sigkill_then_resume_on_two_ranks_repeats_and_skips_no_row(
    sources, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = _argv(
        3, sources["chunks"], _overlay(tmp_path, "base", tmp_path / "unused"), "--trainer.max_steps", "6"
    )
    two = ["--trainer.devices", "2", "--trainer.strategy", "ddp_fork"]
    saved_at, rows = _kill_and_resume(argv, tmp_path, tmp_path / "rows.jsonl", two)
    # steps 1-2 on one rank (2 rows each), steps 3-6 on two ranks (4 rows each): one whole plan, in order
    assert len(rows) == 2 * saved_at + 4 * (6 - saved_at) == 20
    assert rows == _stream(sources["chunks"], 20) and len(set(rows)) == 20


def _kill_and_resume(argv: list[str], tmp_path: Path, log: Path, resume: list[str]) -> tuple[int, list[str]]:
    """Train in a subprocess that SIGKILLs itself before step 4 (last.ckpt at step 2), then resume in this
    process with `resume` appended; the rows of the checkpointed steps and of the resumed run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    killed = [*argv, "-c", str(_overlay(tmp_path, "killed", log, kill_at=3))]
    done = subprocess.run(
        [sys.executable, "-m", "m3d_lit.cli", *killed], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
    saved_at = int(load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"])
    before = _rows(log, up_to=saved_at)  # the batches the checkpoint holds; the next one is trained again
    assert saved_at == 2 and len(_rows(log)) == 6 and len(before) == 4
    log.rename(tmp_path / "killed.jsonl")
    assert main([*argv, "-c", str(_overlay(tmp_path, "resumed", log)), *resume, "--ckpt_path", "last"]) == 0
    return saved_at, before + _rows(log)


@pytest.mark.slow
def test_the_file_module_resumes_exactly_with_max_epochs_set(sources, tmp_path: Path, monkeypatch) -> None:
    """The recipes set max_epochs (3), for which Lightning builds the loader before it reads the checkpoint
    and drops the loader's own state: the DataModule's copy of it keeps the resume exact."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(
        3, sources["chunks"], _overlay(tmp_path, "base", tmp_path / "unused"), "--trainer.max_steps", "6"
    )
    at = argv.index("--data")
    argv[at : at + 4] = ["--data.roots", json.dumps(sources["prepared"])]
    assert main([*argv, "-c", str(_overlay(tmp_path, "whole", tmp_path / "whole.jsonl"))]) == 0
    whole = _rows(tmp_path / "whole.jsonl")
    (tmp_path / "ckpt").rename(tmp_path / "whole_ckpt")
    _, rows = _kill_and_resume(argv, tmp_path, tmp_path / "rows.jsonl", [])
    assert len(whole) == 12 and rows == whole


def _float64_losses(data, steps: int) -> list[float]:
    from lightning.pytorch import Callback, Trainer, seed_everything

    from m3d_lit.tasks import FinetuneTask

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"]))

    seed_everything(0)
    task = FinetuneTask(preset="tiny", overrides=LAMED, warmup_ratio=0.0)
    losses = Losses()
    trainer = Trainer(
        accelerator="cpu", devices=1, precision="64-true", max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    return losses.values


@pytest.mark.slow
def test_unshuffled_streaming_losses_equal_the_file_modules_in_float64(sources) -> None:
    settings = {"batch_size": 2, "shuffle": False, "augment": True, "flip_axes": (0, 1), "blank_prob": 0.25}
    streamed = _float64_losses(StreamingDataModule(sources["chunks"], **settings), steps=12)
    files = _float64_losses(BrainCTQADataModule(sources["prepared"], **settings), steps=12)
    print(f"\nstage-3 float64 losses, streaming {streamed[:3]}..., files {files[:3]}...")
    assert len(streamed) == 12 and streamed[0] != streamed[1]
    # the same samples in the same order through the same float64 computation: equal to the last bit
    assert streamed == files


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(folder.rglob("events.out.tfevents.*"))
    assert runs, f"no event file under {folder}"
    events = EventAccumulator(str(runs[-1].parent))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_logs_samples_tokens_and_mfu_to_tensorboard(
    sources, stage, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((REPO / "stages" / f"{STAGES[stage]}.yaml").read_text())
    (monitor,) = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("ThroughputLogger")]
    monitor["init_args"]["peak_tflops"] = 0.5  # a CPU has no peak figure of its own
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(recipe))
    trainer = {"max_steps": 5, "log_every_n_steps": 2, "limit_val_batches": 0, "enable_progress_bar": False}
    (tmp_path / "trainer.yaml").write_text(json.dumps({"trainer": trainer}))
    argv = _argv(stage, sources["chunks"], tmp_path / "trainer.yaml")
    argv[2] = str(tmp_path / "stage.yaml")
    assert main(argv) == 0
    scalars = _scalars(tmp_path / "runs" / f"stage{stage}")  # the recipe's run folder: runs/stage<N>/
    names = ("samples_per_sec", "tokens_per_sec", "tflops_per_sec", "mfu")
    rates = {n: scalars[f"throughput/{n}"] for n in names}
    # logged at steps 2 and 4 (Lightning's steps 1 and 3): the first batch is left out, not the first interval
    assert all([s for s, _ in v] == [1, 3] for v in rates.values()), rates
    for (_, samples), (_, tokens), (_, tflops), (_, mfu) in zip(*rates.values()):
        assert samples > 0 and all(math.isfinite(v) for v in (samples, tokens, tflops, mfu))
        assert 1 <= tokens / samples <= 48  # non-padding tokens per sample, at most max_length
        assert mfu == pytest.approx(tflops / 0.5, rel=1e-6)  # float32 event values
    assert "train/loss" in scalars
