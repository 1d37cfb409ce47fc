"""Training options of `m3d-lit fit` that LightningCLI would otherwise take in a way a user does not expect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3d_lit.cli import main
from m3d_lit.tasks.base import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLIP_SMALL = {"vision": {"num_layers": 1}, "text": {"num_hidden_layers": 1}}


def _fit_stage1(roots: list[Path], *extra: str) -> int:
    argv = [
        "fit", "-c", str(REPO / "stages/stage1_clip.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "--model.preset", "tiny", "--model.overrides", json.dumps(CLIP_SMALL),
        "--data.roots", json.dumps([str(r) for r in roots]), "--data.mode", "report", "--data.batch_size", "4",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip
    return main(argv)


@pytest.mark.slow
def test_optimizer_option_keeps_the_task_groups_and_schedule(
    prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = [
        "--optimizer", "AdamW", "--optimizer.lr", "1e-3", "--optimizer.weight_decay", "0.05",
        "--model.lr_scale", '{"vision": 2.0}', "--model.min_lr_ratio", "0.25",
    ]  # fmt: skip
    assert _fit_stage1(prepared, *extra) == 0
    checkpoint = load_checkpoint(tmp_path / "checkpoints/stage1/last.ckpt")
    assert checkpoint["global_step"] == 3
    groups = {g["name"]: g for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert "vision" in groups and len(groups) > 1  # the task's per-component groups, not one group of all
    for name, group in groups.items():
        scale = 2.0 if name == "vision" else 1.0
        assert group["lr_scale"] == scale and group["weight_decay"] == 0.05
        assert group["initial_lr"] == 1e-3 * scale  # the task's own product lr * lr_scale, bit for bit
        # step 3 of 3 ends the cosine: 0.25 + 0.75 * 0.5 * (1 + cos(pi)) with cos(pi) == -1.0 exactly, and
        # multiplying by 0.25 is exact; the tolerance only allows another order of the same operations
        assert group["lr"] == pytest.approx(0.25 * 1e-3 * scale, rel=1e-12)
    assert len(checkpoint["lr_schedulers"]) == 1


def test_lr_scheduler_option_is_refused_with_the_task_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _fit_stage1([tmp_path], "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "m3d-lit fit: error: --lr_scheduler: the task schedules the learning rate itself (linear warm-up, then "
        "cosine decay, per step, with per-component lr_scale): set --model.warmup_ratio, --model.min_lr_ratio "
        "and --model.lr_scale, and the peak rate with --model.optimizer.lr"
    )
    assert not any(tmp_path.iterdir())
