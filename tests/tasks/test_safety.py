"""Numerical faults, preemption, atomic checkpoints, safe loading, and no patient data in any output."""

from __future__ import annotations

import ast
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from toy_task import ToyTask

from m3d_lit.data.sampling import ResumableDataLoader
from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint
from m3d_lit.tasks.callbacks import (
    AtomicCheckpointIO,
    NonFiniteError,
    NonFiniteGuard,
    PreemptionCheckpoint,
    StageCheckpoint,
    atomic_torch_save,
)

IDENTIFYING = [b"SYNTH^PATIENT", b"SYNTHID", b"SYNTH GENERAL HOSPITAL", b"SYNACC", b"19400101", b"19410101"]


def _fit(
    folder: Path,
    callbacks: list,
    steps: int = 6,
    task: ToyTask | None = None,
    ckpt: str | None = None,
    every: int = 1,
    log_every: int = 50,
):
    """`steps` steps of `task`, a `last.ckpt` every `every` steps, the guard's checks every `log_every`."""
    torch.manual_seed(0)
    task = task or ToyTask()
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=0, save_last=True)
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, checkpoints], plugins=[AtomicCheckpointIO()], default_root_dir=folder,
        log_every_n_steps=log_every,
    )  # fmt: skip
    trainer.fit(task, ckpt_path=ckpt)
    return task, trainer


def _fused() -> ToyTask:
    """A task whose AdamW can skip a step on the device (`found_inf`), without a host sync."""
    task = ToyTask(optimizer=lambda params: torch.optim.AdamW(params, fused=True))
    task.configure_model()
    return task


@pytest.mark.parametrize("term", ["lm_loss", "dice", "bce"])
def test_non_finite_loss_term_stops_with_step_and_term_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, term: str
) -> None:
    # the optimizer applies the bad update; the next checkpoint asks the guard first, which refuses it
    task = ToyTask()
    task.configure_model()
    task.model.poison = {3: term}
    with pytest.raises(
        NonFiniteError,
        match=rf"non-finite loss term {term}=nan.* at step 3 \(epoch 0, batch 3\): found at the check after "
        r"step 3; the weights since are not saved; last good checkpoint: .*last\.ckpt",
    ):
        _fit(tmp_path / "plain", [NonFiniteGuard()], task=task)
    last = load_checkpoint(tmp_path / "plain" / "last.ckpt")
    assert last["global_step"] == 3  # written after step 3 (global_step 3), before the bad one
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # an optimizer that skips on the device leaves the weights as the last checkpoint holds them
    fused = _fused()
    fused.model.poison = {3: term}
    with pytest.raises(NonFiniteError, match=rf"{term}=nan.* at step 3 .*its update was skipped; 1 skipped"):
        _fit(tmp_path / "fused", [NonFiniteGuard()], task=fused)
    last = load_checkpoint(tmp_path / "fused" / "last.ckpt")
    assert last["global_step"] == 3
    for key, value in last["state_dict"].items():
        assert torch.isfinite(value).all() and torch.equal(value, fused.state_dict()[key])


def test_non_finite_gradient_names_the_parameter(tmp_path: Path) -> None:
    task = ToyTask()
    task.configure_model()
    task.model.poison = {2: "grad"}
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of model\.net\.0\.weight .* at step 2"):
        _fit(tmp_path, [NonFiniteGuard()], task=task)


def test_skip_limit_drops_bad_steps_then_stops(tmp_path: Path) -> None:
    task = ToyTask()
    task.configure_model()
    task.model.poison = {1: "dice", 3: "lm_loss"}
    guard = NonFiniteGuard(skip_limit=2)
    with pytest.warns(UserWarning, match=r"step skipped \(1 of 2 allowed\)"):
        _fit(tmp_path / "a", [guard], task=task)
    assert guard.skipped == 2 and all(torch.isfinite(p).all() for p in task.parameters())
    # a skipped step leaves the weights as they were
    clean = ToyTask()
    clean.configure_model()
    clean.model.poison = {1: "bce"}
    _fit(tmp_path / "b", [NonFiniteGuard(skip_limit=1)], steps=1, task=clean)
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    _fit(
        tmp_path / "b",
        [NonFiniteGuard(skip_limit=1)],
        steps=2,
        task=clean,
        ckpt=str(tmp_path / "b" / "last.ckpt"),
    )
    assert all(torch.equal(before[k], v) for k, v in clean.state_dict().items())
    third = ToyTask()
    third.configure_model()
    third.model.poison = {1: "dice", 2: "dice", 4: "bce"}
    with pytest.raises(
        NonFiniteError,
        match=r"bce=nan, loss=nan at step 4 \(epoch 0, batch 4\) after 2 skipped \(skip_limit 2\)",
    ):
        _fit(tmp_path / "c", [NonFiniteGuard(skip_limit=2)], task=third)
    with pytest.raises(ValueError, match="skip_limit must be >= 0"):
        NonFiniteGuard(skip_limit=-1)


def test_a_fused_optimizer_skips_bad_steps_on_the_device_without_a_per_step_check(tmp_path: Path) -> None:
    task = _fused()
    task.model.poison = {1: "dice", 4: "bce"}  # a NaN term makes every gradient NaN
    guard = NonFiniteGuard(skip_limit=2)
    with pytest.warns(UserWarning, match=r"dice=nan.* at step 1 .*: 1 step\(s\) skipped on the device"):
        _fit(tmp_path / "a", [guard], task=task, every=3, log_every=3)
    assert guard.skipped == 2 and all(torch.isfinite(p).all() for p in task.parameters())
    # a skipped step changes no optimizer state: 6 steps, 2 skipped, AdamW counted 4
    optimizer = task.trainer.optimizers[0]
    assert all(int(optimizer.state[p]["step"]) == 4 for p in task.parameters())


def test_a_bad_step_found_only_at_the_check_is_never_saved(tmp_path: Path) -> None:
    """Checks every 4 steps, checkpoints every 2: the bad update of step 3 is applied, the checkpoint
    after it (global step 4) is refused, and the last one on disk is that of global step 2."""
    task = ToyTask()
    task.configure_model()
    task.model.poison = {3: "lm_loss"}
    with pytest.raises(NonFiniteError, match=r"lm_loss=nan.* at step 3 .*last good checkpoint: .*last\.ckpt"):
        _fit(tmp_path, [NonFiniteGuard(check_every_n_steps=4)], task=task, steps=8, every=2)
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    assert not all(torch.isfinite(p).all() for p in task.parameters())  # what memory held is not on disk
    # without checkpoints the check every 2 steps finds it after step 3 and stops there
    late = ToyTask()
    late.configure_model()
    late.model.poison = {2: "grad"}
    with pytest.raises(
        NonFiniteError, match=r"at step 2 \(epoch 0, batch 2\): found at the check after step 3"
    ):
        _fit(tmp_path / "late", [NonFiniteGuard(check_every_n_steps=2)], task=late, every=100)
    assert late.trainer.global_step == 4
    with pytest.raises(ValueError, match="check_every_n_steps must be >= 1"):
        NonFiniteGuard(check_every_n_steps=0)


class _PlateauTask(ToyTask):
    """Validation logs the same `val/loss` every epoch: only the first epoch ever enters the top k."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", 1.0, batch_size=len(batch))

    def val_dataloader(self) -> ResumableDataLoader:
        return self.train_dataloader()


class _LastStepAtEpochStart(Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer: Trainer, pl_module) -> None:
        if self.path.exists():
            self.seen.append(load_checkpoint(self.path)["global_step"])


def test_last_checkpoint_is_the_newest_state_even_when_the_monitor_stops_improving(tmp_path: Path) -> None:
    # 8 batches per epoch: epochs end at steps 8 and 16, and max_steps 20 stops inside the third epoch
    checkpoint = StageCheckpoint(
        dirpath=tmp_path, filename="{epoch}-{step}", monitor="val/loss", save_top_k=1, save_last=True,
        save_on_train_epoch_end=True,
    )  # fmt: skip
    probe = _LastStepAtEpochStart(tmp_path / "last.ckpt")
    trainer = Trainer(
        accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[checkpoint, probe], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_PlateauTask())
    assert probe.seen == [8, 16]  # Lightning's save_last stays at step 8, the only top-k save
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 20
    assert sorted(p.name for p in tmp_path.glob("epoch=*.ckpt")) == ["epoch=0-step=8.ckpt"]


def test_a_second_run_in_the_same_folder_overwrites_last_checkpoint(tmp_path: Path) -> None:
    # re-running a stage: the next stage and `make eval` read last.ckpt, never the earlier run's weights
    def run(max_steps: int) -> None:
        checkpoint = StageCheckpoint(
            dirpath=tmp_path, filename="{epoch}-{step}", monitor="val/loss", save_top_k=1, save_last=True,
            save_on_train_epoch_end=True,
        )  # fmt: skip
        trainer = Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[checkpoint], default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(_PlateauTask())

    run(20)
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 20
    run(12)
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 12
    assert sorted(p.name for p in tmp_path.glob("last*.ckpt")) == ["last.ckpt"]


class _SendSignal(Callback):
    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_then_exits_and_the_resume_is_exact(tmp_path: Path, name: str) -> None:
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    whole, _ = _fit(tmp_path / "whole", [PreemptionCheckpoint()])
    with pytest.raises(SystemExit) as stop:
        _fit(tmp_path / "cut", [_SendSignal(signum, at_step=2), PreemptionCheckpoint()])
    assert stop.value.code == 128 + signum
    assert signal.getsignal(signum) == before  # no handler of the run outlives it
    assert load_checkpoint(tmp_path / "cut" / "last.ckpt")["global_step"] == 2
    resumed, _ = _fit(tmp_path / "cut", [PreemptionCheckpoint()], ckpt="last")
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with pytest.raises(ValueError, match="unknown signal names"):
        PreemptionCheckpoint(signals=("SIGNOPE",))


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def killed_half_way(obj, handle) -> None:
        real_save(obj, handle)
        handle.truncate(handle.tell() // 2)
        assert torch.load(path, weights_only=True)["step"] == 1  # readers still see the old file
        raise KeyboardInterrupt  # the kill arrives mid-write

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 2


def _calls(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_loading_is_weights_only_and_remote_code_is_never_trusted() -> None:
    seen = {"torch.load": 0, "trust_remote_code": 0}
    for source in sorted((REPO / "src").rglob("*.py")):
        tree = ast.parse(source.read_text(), filename=str(source))
        for call in _calls(tree):
            func = call.func
            keywords = {k.arg: k.value for k in call.keywords}
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and getattr(func.value, "id", "") == "torch"
            ):
                seen["torch.load"] += 1
                value = keywords.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{source}:{call.lineno}"
            if "trust_remote_code" in keywords:
                seen["trust_remote_code"] += 1
                value = keywords["trust_remote_code"]
                assert isinstance(value, ast.Constant) and value.value is False, f"{source}:{call.lineno}"
            if "allow_pickle" in keywords:
                value = keywords["allow_pickle"]
                assert isinstance(value, ast.Constant) and value.value is False, f"{source}:{call.lineno}"
    assert seen["torch.load"] >= 2 and seen["trust_remote_code"] >= 3


def test_output_paths_stay_inside_the_output_folder(tmp_path: Path) -> None:
    from m3d_lit.data.prepare import safe_id
    from m3d_lit.errors import InputError
    from m3d_lit.evaluation.markdown_report import write_report

    for sid in ("../x", "a/b", "..", "a\\b", ".hidden", "x..y"):
        with pytest.raises(InputError, match="is not allowed"):
            safe_id(sid)
    out = tmp_path / "deep" / "out"
    record = {"id": "../../escape", "dataset": "cq500", "kind": "open", "question": "q?",
              "answer": "yes", "prediction": "yes"}  # fmt: skip
    from m3d_lit.evaluation.grouped_scores import compute_metrics

    write_report(out, compute_metrics([record]), [record], title="t", images=lambda r: torch.rand(1, 4, 8, 8))
    outside = [p for p in tmp_path.rglob("*") if out not in p.parents and p != out and p.is_file()]
    assert not outside and any(out.rglob("*.png"))


def _leaks(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {n!r}" for n in IDENTIFYING if n in data]
    return found


@pytest.mark.slow
def test_no_identifying_dicom_field_reaches_any_output(
    synthetic_raw: Path, prepared: list[Path], stage3_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    import pydicom

    from m3d_lit.cli import main

    first = next((synthetic_raw / "cq500").rglob("CT000000.dcm"))
    assert str(pydicom.dcmread(first).PatientName).startswith("SYNTH^PATIENT")  # the inputs do carry them
    cq500 = Path(shutil.copytree(synthetic_raw / "cq500", tmp_path / "raw"))
    assert _leaks(cq500)  # the search does find them in the raw files
    shutil.rmtree(next(cq500.glob("CQ500-CT-1*")))  # a listed scan without images: reported, not leaked
    size = ["--size", "32", "64", "64"]
    assert main(["prepare", "cq500", "--root", str(cq500), "--out", str(tmp_path / "prepared"), *size]) == 0
    qa = prepared[0] / "qa_test.jsonl"
    argv = ["eval", "--checkpoint", str(stage3_checkpoint), "--data", str(qa), "--out", str(tmp_path / "eval"),
            "--limit", "4", "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    run_folder = stage3_checkpoint.parents[2]  # checkpoints/ and the TensorBoard runs/ of the stage run
    outputs = [tmp_path / "prepared", tmp_path / "eval", *prepared, run_folder]
    assert any(run_folder.rglob("events.out.tfevents.*")) and any((tmp_path / "eval").rglob("*.png"))
    leaks = [leak for folder in outputs for leak in _leaks(folder)]
    leaks += [f"console: {n!r}" for n in IDENTIFYING if n.decode() in captured.out + captured.err]
    assert not leaks, leaks[:5]
