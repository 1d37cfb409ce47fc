"""Exact resume: a run killed with SIGKILL mid-epoch and resumed with `--ckpt_path last` ends with the
weights and logged losses of a run that was never interrupted; the pieces that make it so (resumable
loader, RNG states, checkpoints without the frozen LLM, fingerprints) are tested one by one too."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TESTS, built
from run_overlays import EVERY, SMALL, STEPS, logged_losses, run_overlay
from torch.utils.data import Dataset

from m3d_lit.cli import main
from m3d_lit.data.sampling import EpochSampler, ResumableDataLoader
from m3d_lit.errors import InputError
from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint
from m3d_lit.inference.loading import load_model
from m3d_lit.tasks.checkpoints import rng_states, set_rng_states


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, key):
        return int(key.index) * 100 + int(key.epoch)


def _loader(workers: int = 0, seed: int = 0) -> ResumableDataLoader:
    data = _Numbers()
    return ResumableDataLoader(data, batch_size=2, sampler=EpochSampler(data, seed=seed), num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_after_the_batches_it_handed_out(workers: int) -> None:
    reference = _loader(workers)
    reference.sampler.set_epoch(1)
    full = [b.tolist() for b in reference]
    interrupted = _loader(workers)
    interrupted.sampler.set_epoch(1)
    taken = []
    for batch in interrupted:
        taken.append(batch.tolist())
        if len(taken) == 4:
            state = interrupted.state_dict()
            break
    resumed = _loader(workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives any serialisation
    assert taken + [b.tolist() for b in resumed] == full
    resumed.sampler.set_epoch(2)
    assert len([b for b in resumed]) == len(resumed) == 6  # the next epoch is whole again


def test_loader_state_at_the_end_of_an_epoch_starts_the_next() -> None:
    loader = _loader()
    batches = [b.tolist() for b in loader]
    state = loader.state_dict()
    assert state == {"sampler": {"epoch": 0, "seed": 0, "num_replicas": 1}, "batches_taken": len(batches)}
    resumed = _loader()
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 1 and all(x % 100 == 1 for b in resumed for x in b.tolist())


def test_loader_refuses_the_state_of_another_seed() -> None:
    with pytest.raises(ValueError, match="sampler has seed=0, this run has seed=5"):
        _loader(seed=5).load_state_dict(_loader().state_dict())
    with pytest.raises(ValueError, match="needs an EpochSampler"):
        ResumableDataLoader(_Numbers(), batch_size=2)


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    states = rng_states()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng": states}, tmp_path / "rng.pt")
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def _local_llm(folder: Path, seed: int) -> Path:
    """A tiny Llama + tokenizer saved like a downloaded model directory (what `llm_path` points at)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from m3d_lit.models.presets import resolve
    from m3d_lit.models.tokenizer import build_llm_tokenizer

    tokenizer = build_llm_tokenizer(None)
    torch.manual_seed(seed)
    config = {**resolve("tiny", SMALL)["llm"], "vocab_size": len(tokenizer)}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_like_lightning(task, path: Path) -> dict:
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


def test_stage3_checkpoint_leaves_out_the_frozen_llm_and_loads_strictly(tmp_path: Path) -> None:
    from m3d_lit.tasks import FinetuneTask

    llm = _local_llm(tmp_path / "llm", seed=1)
    task = built(FinetuneTask(preset="tiny", overrides={"vision": SMALL["vision"]}, llm_path=str(llm)))
    with torch.no_grad():  # stands for training: every trainable weight moves
        for p in task.parameters():
            if p.requires_grad:
                p.add_(0.01)
    saved = _save_like_lightning(task, tmp_path / "stage3.ckpt")
    frozen_llm = [k for k, p in task.named_parameters() if k.startswith("model.llm.") and not p.requires_grad]
    assert frozen_llm and sorted(saved["m3d_lit"]["omitted"]) == sorted(frozen_llm)
    assert not set(frozen_llm) & set(saved["state_dict"])
    assert any("lora_" in k for k in saved["state_dict"]) and any(
        k.startswith("model.vision.") for k in saved["state_dict"]
    )
    full = sum(v.numel() for v in task.state_dict().values())
    kept = sum(v.numel() for v in saved["state_dict"].values())
    loaded = load_model(tmp_path / "stage3.ckpt").model  # rebuilt from the bundle, the LLM from llm_path
    for key, value in task.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert kept < full

    other = _local_llm(tmp_path / "other_llm", seed=2)  # as if the LLM directory had been replaced
    checkpoint = load_checkpoint(tmp_path / "stage3.ckpt")
    checkpoint["m3d_lit"]["bundle"]["llm_path"] = str(other)
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    with pytest.raises(InputError, match=r"moved\.ckpt: its base LLM \(.*other_llm\) now holds other weights"):
        load_model(tmp_path / "moved.ckpt")


def _argv(roots: list[Path], overlay: Path, *extra: str) -> list[str]:
    return [
        "fit", "-c", str(REPO / "stages" / "stage3_finetune.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "-c", str(overlay),
        "--model.preset", "tiny", "--model.init_from", "null", "--model.overrides", json.dumps(SMALL),
        "--data.roots", json.dumps([str(r) for r in roots]), "--data.batch_size", "2",
        *extra,
    ]  # fmt: skip


def _killed_after_checkpoint(folder: Path, argv: list[str]) -> int:
    """Run `m3d-lit` in a subprocess that SIGKILLs itself one step after the checkpoint at step EVERY.

    The kill comes from inside the run (`kill_switch.KillAtStep`), so it lands at the same step on a
    fast machine and a slow one; returns the step of the `last.ckpt` it left.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "m3d_lit.cli", *argv], cwd=folder, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
    return int(load_checkpoint(folder / "killed" / "last.ckpt")["global_step"])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(
    prepared: list[Path], tmp_path: Path
) -> None:
    saved_at = _killed_after_checkpoint(
        tmp_path, _argv(prepared, run_overlay(tmp_path, "killed", 0, kill_at=EVERY + 1))
    )
    killed = logged_losses(tmp_path, "killed", 0)
    assert saved_at == EVERY and max(killed) == EVERY  # one logged step after the checkpoint is redone
    assert main(_argv(prepared, run_overlay(tmp_path, "killed", 1), "--ckpt_path", "last")) == 0
    assert main(_argv(prepared, run_overlay(tmp_path, "whole", 0))) == 0

    whole, resumed = logged_losses(tmp_path, "whole", 0), logged_losses(tmp_path, "killed", 1)
    assert sorted(whole) == list(range(STEPS))
    assert sorted(resumed) == list(range(saved_at, STEPS))  # the resumed run starts after the checkpoint
    assert all(killed[s] == whole[s] for s in killed) and all(resumed[s] == whole[s] for s in resumed)
    final = load_checkpoint(tmp_path / "killed" / "last.ckpt")
    reference = load_checkpoint(tmp_path / "whole" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == STEPS
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    print(f"\nresume: killed after step {max(killed) + 1}, resumed from step {saved_at}, {STEPS} steps; "
          f"{len(reference['state_dict'])} tensors and {STEPS} losses equal (last {whole[STEPS - 1]})")  # fmt: skip
