"""What the GPU strategies' checkpoints are on disk, tested where no GPU is needed.

DeepSpeed needs CUDA (Lightning refuses its strategy on a CPU), so the `zero2_8x4090` preset's run itself
cannot be tested here: what is tested is what m3d-lit adds to it, the folder written under a temporary
name and put in place whole, and the plain `m3d_lit.ckpt` inside it that eval, ask, export and the next
stage read. The `fsdp` preset runs for real on two CPU ranks in test_multinode.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LAMED, built

from m3d_lit.errors import InputError
from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint
from m3d_lit.inference.loading import load_model
from m3d_lit.tasks import FinetuneTask
from m3d_lit.tasks.strategies import ZeroStrategy, save_folder_atomically, write_consolidated


class _OneProcess:
    """The part of a Lightning strategy `save_folder_atomically` uses, for a single process."""

    global_rank = 0

    def broadcast(self, value):
        return value

    def barrier(self, name: str) -> None:
        pass


def _deepspeed_files(folder: Path) -> None:
    """What DeepSpeed writes into the folder (its own files; m3d-lit never reads them)."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed module states")
    (folder / "latest").write_text("checkpoint")


def test_a_folder_is_put_in_place_whole_and_a_failed_write_leaves_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    save_folder_atomically(_OneProcess(), target, _deepspeed_files)
    assert (target / "latest").read_text() == "checkpoint"

    def broken(folder: Path) -> None:
        _deepspeed_files(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_folder_atomically(_OneProcess(), target, broken)
    assert (target / "checkpoint" / "mp_rank_00_model_states.pt").is_file()  # the previous one, whole

    def newer(folder: Path) -> None:
        _deepspeed_files(folder)
        (folder / "latest").write_text("newer")

    save_folder_atomically(_OneProcess(), target, newer)
    assert (target / "latest").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["last.ckpt"]
    assert not list(tmp_path.glob(".last.ckpt.previous"))


def test_the_zero_folder_is_read_by_eval_and_the_next_stage_through_its_plain_file(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the tiny LLM is random: the next stage draws the same one (init_from checks it)
    task = built(FinetuneTask(preset="tiny", overrides=LAMED))
    with torch.no_grad():  # stands for training
        for param in task.parameters():
            if param.requires_grad:
                param.add_(0.25)
    # what Lightning hands the strategy: the state dict, the hyperparameters and the task's record
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "global_step": 7}
    task.on_save_checkpoint(checkpoint)
    checkpoint["optimizer_states"] = [{"state": {}, "param_groups": []}]  # DeepSpeed keeps its own

    def write(folder: Path) -> None:
        write_consolidated(checkpoint, folder)
        _deepspeed_files(folder)

    folder = tmp_path / "last.ckpt"
    save_folder_atomically(_OneProcess(), folder, write)
    assert "optimizer_states" not in load_checkpoint(folder)
    loaded = load_model(folder, kind="lamed")  # eval, ask, bench and export load through this
    assert loaded.source.global_step == 7
    weights = loaded.model.state_dict()
    for key, value in task.model.state_dict().items():
        assert torch.equal(weights[key], value), key
    torch.manual_seed(0)
    following = built(FinetuneTask(preset="tiny", overrides=LAMED, init_from=str(folder)))
    following.load_init_weights(folder)
    assert {"vision", "perceiver", "segmentation"} <= set(following.init_summary["init_from"])


def test_zero_stage_3_is_refused() -> None:
    with pytest.raises(InputError, match="ZeroStrategy takes stage 1 or 2"):
        ZeroStrategy(stage=3)
