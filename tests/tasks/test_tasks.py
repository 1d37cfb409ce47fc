"""The three stages through the real CLI on synthetic data, the init_from chain, freezing and resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, built

from m3d_lit.cli import main
from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint

CPU = str(REPO / "stages" / "trainer" / "cpu.yaml")


def fit(recipe: str, roots: list[Path], mode: str, *extra: str) -> None:
    argv = [
        "fit", "-c", str(REPO / "stages" / recipe), "-c", CPU,
        "--model.preset", "tiny",
        "--data.roots", json.dumps([str(r) for r in roots]),
        "--data.mode", mode,
        "--data.batch_size", "4",
        "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip
    assert main(argv) == 0


@pytest.mark.slow
def test_stage_chain_moves_weights(
    prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fit("stage1_clip.yaml", prepared, "report")
    fit("stage2_align.yaml", prepared, "report")
    fit("stage3_finetune.yaml", prepared, "qa")
    one, two, three = (
        load_checkpoint(tmp_path / f"runs/stage{i}/version_0/checkpoints/last.ckpt")["state_dict"]
        for i in (1, 2, 3)
    )
    vision = [k for k in one if k.startswith("model.vision.")]
    assert vision
    # stage 2 keeps the stage-1 vision encoder frozen: bit-identical
    assert all(torch.equal(one[k], two[k]) for k in vision)
    # stage 3 starts from stage 2's perceiver and trains it further
    perceiver = [k for k in two if k.startswith("model.perceiver.")]
    assert perceiver and any(not torch.equal(two[k], three[k]) for k in perceiver)
    assert any(k.startswith("model.segmentation.") for k in three)
    for i in (1, 2, 3):  # each run's logs beside its checkpoints
        assert list((tmp_path / f"runs/stage{i}/version_0").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_continues_step_count_in_its_own_run(
    prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs/stage1/version_0"
    fit("stage1_clip.yaml", prepared, "report")
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 2
    fit("stage1_clip.yaml", prepared, "report", "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 4  # the same run, continued
    assert sorted(p.name for p in (tmp_path / "runs/stage1").iterdir()) == ["version_0"]
    # its config.yaml is still the one it started with; the resumption's is beside it
    assert "ckpt_path: null" in (run / "config.yaml").read_text()
    assert "ckpt_path: runs/stage1/version_0/checkpoints" in (run / "config.resumed.yaml").read_text()


@pytest.mark.slow
def test_two_fits_leave_two_runs_and_the_next_stage_takes_the_latest(
    prepared: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    fit("stage1_clip.yaml", prepared, "report")
    fit("stage1_clip.yaml", prepared, "report", "--seed_everything", "7")
    runs = tmp_path / "runs/stage1"
    first, second = (load_checkpoint(runs / f"version_{i}/checkpoints/last.ckpt") for i in (0, 1))
    assert not torch.equal(
        first["state_dict"]["model.vision.norm.weight"], second["state_dict"]["model.vision.norm.weight"]
    )
    for i in (0, 1):  # each run keeps its config and logs beside its checkpoints
        assert (runs / f"version_{i}/config.yaml").is_file() and list(
            (runs / f"version_{i}").glob("events.*")
        )
    with caplog.at_level("INFO"):
        fit("stage2_align.yaml", prepared, "report")  # init_from: runs/stage1, its latest run
    took = (
        "init_from latest run of runs/stage1 is version_1: took runs/stage1/version_1/checkpoints/last.ckpt"
    )
    assert took in [r.getMessage() for r in caplog.records]
    # a named run that already holds checkpoints is refused, before anything is written
    argv = ["--trainer.logger.init_args.version", "version_0"]
    with pytest.raises(AssertionError):
        fit("stage1_clip.yaml", prepared, "report", *argv)
    assert "holds the checkpoints of an earlier run" in capsys.readouterr().err


def test_init_from_refuses_checkpoint_without_the_weights(tmp_path: Path) -> None:
    from m3d_lit.errors import InputError
    from m3d_lit.tasks import AlignTask

    task = built(AlignTask(preset="tiny"))
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.something.weight": torch.zeros(1)}}, path)
    with pytest.raises(InputError, match="lacks"):
        task.load_init_weights(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        task.load_init_weights(path)


SMALL = {"vision": {"num_layers": 1}, "llm": {"num_hidden_layers": 1}}


def _checkpoint_of(task, path: Path, parts: tuple[str, ...]) -> dict:
    """Save `task` like Lightning after moving every weight under `parts` (as training or a load would)."""
    with torch.no_grad():
        for name, param in task.named_parameters():
            if name.startswith(parts):
                param.add_(0.5)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint["state_dict"]


def test_stage3_keeps_every_part_stage2_handed_it_and_says_which_start_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from m3d_lit.tasks import AlignTask, FinetuneTask

    torch.manual_seed(0)  # the random tiny LLM of both stages is the same model (init_from checks it)
    handed = (
        "model.vision.",
        "model.perceiver.",
        "model.new_tokens.",
        "model.segmentation.",
        "model.seg_head.",
    )
    source = _checkpoint_of(built(AlignTask(preset="tiny", overrides=SMALL)), tmp_path / "stage2.ckpt", handed)
    torch.manual_seed(0)
    stage3 = built(FinetuneTask(preset="tiny", overrides=SMALL))
    with caplog.at_level("INFO"):
        stage3.load_init_weights(tmp_path / "stage2.ckpt")
    own = stage3.state_dict()
    kept = [k for k in own if k.startswith(handed)]
    assert any(k.startswith("model.segmentation.") for k in kept)
    assert all(torch.equal(own[k], source[k]) for k in kept)
    lora = sum("lora_" in k for k in own)
    summary = stage3.init_summary
    assert set(summary["init_from"]) == {"vision", "perceiver", "new_tokens", "segmentation", "seg_head"}
    assert summary["fresh"] == {"llm LoRA": lora} and set(summary["base"]) == {"llm"}
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("init_from"))
    assert re.fullmatch(
        r"init_from .*stage2\.ckpt: took vision \(\d+ tensors\), perceiver .*, segmentation \(\d+ tensors\), "
        r"seg_head .*; from the preset \(random, as in the checkpoint\): llm \(\d+ tensors\); "
        rf"fresh \(not in the checkpoint\): llm LoRA \({lora} tensors\)",
        message,
    ), message

    # a stage-3 checkpoint handed to another stage-3 run carries its LoRA adapters on as well
    source = _checkpoint_of(stage3, tmp_path / "stage3.ckpt", ("model.llm.",))
    torch.manual_seed(0)
    again = built(FinetuneTask(preset="tiny", overrides=SMALL))
    again.load_init_weights(tmp_path / "stage3.ckpt")
    assert again.init_summary["fresh"] == {} and again.init_summary["init_from"]["llm LoRA"] == lora
    assert all(torch.equal(again.state_dict()[k], source[k]) for k in source if "lora_" in k)


def test_align_step_changes_only_trainable_weights(prepared: list[Path]) -> None:
    from lightning.pytorch import Trainer

    from m3d_lit.data.datamodules import BrainCTQADataModule
    from m3d_lit.tasks import AlignTask

    task = built(AlignTask(preset="tiny", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)))
    before = {k: v.clone() for k, v in task.state_dict().items()}
    data = BrainCTQADataModule([str(r) for r in prepared], mode="report", batch_size=4)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    after = task.state_dict()
    params = dict(task.model.named_parameters())
    trainable = {f"model.{n}" for n, p in params.items() if p.requires_grad}
    frozen = {f"model.{n}" for n, p in params.items() if not p.requires_grad}
    assert trainable and all(n.startswith(("model.perceiver.", "model.new_tokens.")) for n in trainable)
    assert frozen
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    # buffers of frozen parts (none of them is batch-normalised) stay too; the perceiver's may move
    for key in set(after) - trainable - frozen:
        if not key.startswith("model.perceiver."):
            assert torch.equal(before[key], after[key]), f"buffer {key} of a frozen part changed"
    assert any(not torch.equal(before[k], after[k]) for k in trainable)


def test_every_recipe_parses() -> None:
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    from m3d_lit.data.datamodules import BaseDataModule
    from m3d_lit.tasks import BaseTask

    recipes = sorted((REPO / "stages").glob("*.yaml"))
    presets = sorted((REPO / "stages" / "trainer").glob("*.yaml"))
    datamodules = sorted((REPO / "datamodules").glob("*.yaml"))
    assert len(recipes) == 3 and presets and datamodules
    for recipe in recipes:
        for extra in [
            [],
            *(["--config", str(p)] for p in presets),
            *(["--data", str(d)] for d in datamodules),
        ]:
            parser = LightningArgumentParser(exit_on_error=False)
            parser.add_argument("--config", action=ActionConfigFile)
            parser.add_lightning_class_args(Trainer, "trainer")
            parser.add_lightning_class_args(BaseTask, "model", subclass_mode=True)
            parser.add_lightning_class_args(BaseDataModule, "data", subclass_mode=True)
            parser.add_argument("--seed_everything", type=int)
            config = parser.parse_args(["--config", str(recipe), *extra])
            assert config.model.class_path.startswith("m3d_lit.tasks.")
