"""Several processes train stage 3 as one process does on the same global batch, and resume exactly.

- Two "machines" on localhost, launched as the README launches several machines (`torchrun --nnodes 2
  --nproc-per-node 1 --node-rank R ... -m m3d_lit.cli fit ... -c multinode`), DDP with gloo, float64.
- The `fsdp` preset (FSDP2 through Lightning's ModelParallelStrategy) on two CPU ranks, float32 (the
  strategy takes no float64); its sharded checkpoint folder is read back by eval/ask/export's loader and
  by the next stage's `init_from`.

No dropout or augmentation, so the computations differ only in the order of their sums (the batch split
over two ranks, the reduction of the gradients). Each run is killed (`tests/kill_switch.py`) one step
after its checkpoint and resumed with `--ckpt_path last`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TESTS
from run_overlays import EVERY, SMALL, logged_losses, run_overlay

from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint

GLOBAL_BATCH, STEPS = 4, 4
# float64 (unit roundoff 1.1e-16): losses near 1-10 summed in another order differ by ~1e-15 per step, and
# AdamW at the recipe's lr 2e-5 moves weights by ~2e-5 per step, so after STEPS steps the runs agree to far
# better than 1e-9; a wrong share of the global batch moves a loss by more than 1e-3
TOLERANCE_FP64 = 1e-9
# float32 (unit roundoff 6e-8): sums of ~1e4 terms in another order differ by ~1e-6 relative (measured:
# losses ~8 differ by <= 6e-6 after 4 steps). With plain SGD a weight's difference is lr times its
# gradient's (AdamW's normalised step would let a near-zero gradient's rounding move a weight by a whole
# lr); a wrong share of the global batch moves a loss by more than 1e-2
TOLERANCE_FP32 = 1e-4
# the fsdp preset clips gradients at norm 1: the reference does too (global norm of sharded gradients)
FP32_SGD = ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05", "--trainer.gradient_clip_val", "1.0"]
# as the recipes have it: Lightning then builds the training loader before a sharded checkpoint is restored
WITH_EPOCHS = ["--trainer.max_epochs", "3"]


def _fit_args(roots: list[Path], overlay: Path, batch: int, precision: str, *extra: str) -> list[str]:
    return [
        "fit", "-c", "stage3", "-c", "cpu", *extra, "-c", str(overlay),
        "--model.preset", "tiny", "--model.init_from", "null", "--model.overrides", json.dumps(SMALL),
        "--model.lora", json.dumps({"r": 8, "alpha": 16, "dropout": 0.0}),
        "--data.roots", json.dumps([str(r) for r in roots]), "--data.batch_size", str(batch),
        "--data.augment", "false", "--trainer.precision", precision, "--seed_everything", "0",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def _run(folder: Path, command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=folder, env=_env(), capture_output=True, timeout=900, check=False)


def _m3d(folder: Path, args: list[str]) -> subprocess.CompletedProcess:
    return _run(folder, [sys.executable, "-m", "m3d_lit.cli", *args])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_machines(folder: Path, args: list[str]) -> list[subprocess.CompletedProcess]:
    """Run `m3d-lit` as node 0 and node 1 of a 2-machine torchrun job on this host; both finish."""
    port = _free_port()
    processes = []
    for node in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "m3d_lit.cli", *args, "-c", "multinode", "--trainer.num_nodes", "2",
            # the perceiver's batch norm takes its statistics over the global batch, as one process does
            "--trainer.sync_batchnorm", "true",
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(
                command, cwd=folder, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        )
    results = []
    for process in processes:
        _, err = process.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, None, err))
    return results


def _reference(folder: Path, roots: list[Path], precision: str, *extra: str) -> dict[int, str]:
    """One process on the whole global batch: the losses of every step and its last.ckpt."""
    overlay = run_overlay(folder, "single", 0, steps=STEPS)
    done = _m3d(folder, _fit_args(roots, overlay, GLOBAL_BATCH, precision, *extra))
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    losses = logged_losses(folder, "single", 0)
    assert sorted(losses) == list(range(STEPS))
    return losses


def _assert_same_run(folder: Path, run: str, reference: dict[int, str], tolerance: float) -> None:
    """Versions 0 (killed after step EVERY + 1) and 1 (resumed) of `run` logged the reference's losses and
    ended with its weights."""
    before, after = logged_losses(folder, run, 0), logged_losses(folder, run, 1)
    assert sorted(before) == list(range(EVERY + 1)) and sorted(after) == list(range(EVERY, STEPS))
    for step, loss in {**before, **after}.items():  # the global batch's loss, as one process has it
        assert float(loss) == pytest.approx(float(reference[step]), abs=tolerance, rel=tolerance), step
    ours = load_checkpoint(folder / run / "last.ckpt")
    theirs = load_checkpoint(folder / "single" / "last.ckpt")
    assert ours["global_step"] == theirs["global_step"] == STEPS
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.allclose(ours["state_dict"][key], value, rtol=tolerance, atol=tolerance), key


@pytest.mark.slow
def test_two_machines_train_as_one_process_and_resume_exactly(prepared: list[Path], tmp_path: Path) -> None:
    reference = _reference(tmp_path, prepared, "64-true")
    killed = _fit_args(
        prepared, run_overlay(tmp_path, "nodes", 0, kill_at=EVERY + 1, steps=STEPS), GLOBAL_BATCH // 2, "64-true"
    )
    for result in _two_machines(tmp_path, killed):  # each machine kills itself one step after its checkpoint
        assert result.returncode != 0, result.stderr.decode()[-3000:]
    assert load_checkpoint(tmp_path / "nodes" / "last.ckpt")["global_step"] == EVERY
    resumed = run_overlay(tmp_path, "nodes", 1, steps=STEPS)
    resumed_args = [*_fit_args(prepared, resumed, GLOBAL_BATCH // 2, "64-true"), "--ckpt_path", "last"]
    for result in _two_machines(tmp_path, resumed_args):
        assert result.returncode == 0, result.stderr.decode()[-3000:]
    _assert_same_run(tmp_path, "nodes", reference, TOLERANCE_FP64)


FSDP_CPU = [
    "-c", "fsdp", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.sync_batchnorm", "true",
    "--trainer.strategy.init_args.process_group_backend", "gloo", "--data.num_workers", "0",
    "--data.pin_memory", "false",
]  # fmt: skip


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_as_one_process_and_its_folder_is_read_back(
    prepared: list[Path], tmp_path: Path
) -> None:
    from m3d_lit.inference.loading import load_model
    from m3d_lit.tasks import FinetuneTask

    reference = _reference(tmp_path, prepared, "32-true", *FP32_SGD)
    killed = run_overlay(tmp_path, "fsdp", 0, kill_at=EVERY + 1, steps=STEPS)
    args = _fit_args(prepared, killed, GLOBAL_BATCH // 2, "32-true", *FSDP_CPU, *FP32_SGD)
    done = _m3d(tmp_path, [*args, *WITH_EPOCHS])
    assert done.returncode != 0
    folder = tmp_path / "fsdp" / "last.ckpt"
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    assert folder.is_dir() and shards == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(folder.parent.glob(".*.tmp"))  # written under a temporary name, then renamed
    resumed = run_overlay(tmp_path, "fsdp", 1, steps=STEPS)
    resumed_args = _fit_args(prepared, resumed, GLOBAL_BATCH // 2, "32-true", *FSDP_CPU, *FP32_SGD)
    done = _m3d(tmp_path, [*resumed_args, *WITH_EPOCHS, "--ckpt_path", "last"])
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    _assert_same_run(tmp_path, "fsdp", reference, TOLERANCE_FP32)

    # eval, ask, bench and export load a checkpoint through load_model; the next stage through init_from
    loaded, single = load_model(folder, kind="lamed"), load_model(tmp_path / "single" / "last.ckpt")
    assert loaded.source.global_step == STEPS
    ours, theirs = loaded.model.state_dict(), single.model.state_dict()
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, rtol=TOLERANCE_FP32, atol=TOLERANCE_FP32), key
    torch.manual_seed(0)  # the tiny LLM is random: the same draws as the run's (init_from checks its weights)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    following = FinetuneTask(preset="tiny", overrides=SMALL, lora=lora, init_from=str(folder))
    following.configure_model()
    following.load_init_weights(folder)
    assert set(following.init_summary["init_from"]) >= {"vision", "perceiver", "segmentation", "llm LoRA"}
