"""What a real recipe run writes to TensorBoard: scalars, hyperparameters, images and the text table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIP, LAMED, REPO

from m3d_lit.cli import main


def fit(recipe: str, roots: list[Path], mode: str, overrides: dict, *extra: str) -> None:
    """Two training steps of a recipe, then one validation batch, logging every step."""
    argv = [
        "fit", "-c", str(REPO / "stages" / recipe), "-c", str(REPO / "stages" / "trainer" / "cpu.yaml"),
        "--model.preset", "tiny", "--model.overrides", json.dumps(overrides), "--model.init_from", "null",
        "--data.roots", json.dumps([str(r) for r in roots]), "--data.mode", mode,
        "--data.batch_size", "4", "--data.augment", "false",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip
    assert main(argv) == 0


def read_run(run: Path) -> tuple[dict[str, list[str]], Any]:
    """The tags of the run's single event file, and the accumulator holding them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run.glob("version_0/events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    return acc.Tags(), acc


def hparams_of(acc: Any) -> tuple[list[str], dict[str, Any]]:
    """(metric tags, hyperparameter name -> value) from the HPARAMS plugin records."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = acc.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return [m.name.tag for m in experiment.metric_infos], values


@pytest.mark.slow
def test_stage3_logs_scalars_hparams_images_and_text(
    brainct_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # physionet first: the first validation batch then holds a segmentation sample whose answer is [SEG]
    roots = [brainct_data["physionet"], brainct_data["cq500"]]
    fit("stage3_finetune.yaml", roots, "qa", LAMED, "--model.max_new_tokens", "4")
    tags, acc = read_run(tmp_path / "runs" / "stage3")
    scalars = set(tags["scalars"])
    wanted = {"train/loss", "train/lm_loss", "train/grad_norm", "val/loss", "val/lm_loss", "val/token_acc"}
    assert wanted | {"val/dice", "val/loss_dice", "val/loss_bce"} <= scalars, scalars
    assert {"lr-AdamW/llm", "lr-AdamW/perceiver", "lr-AdamW/segmentation"} <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]
    assert 0.0 <= acc.Scalars("val/dice")[-1].value <= 1.0
    assert tags["images"] == ["val/middle_slices"]
    image = acc.Images("val/middle_slices")[-1]
    assert (image.height, image.width) == (16, 16 * 4)  # four middle slices side by side
    assert "val/examples/text_summary" in tags["tensors"]
    table = acc.Tensors("val/examples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| question | reference | generated |" in table and "Segment the hemorrhage." in table
    metrics, values = hparams_of(acc)
    assert metrics == ["val/loss", "val/token_acc", "val/dice"]
    assert values["preset"] == "tiny" and values["lora/r"] == 16 and values["w_dice"] == 1.0
    assert values["overrides/llm/hidden_size"] == 32 and values["init_from"] == "None"


@pytest.mark.slow
def test_stage1_logs_recall_at_k(
    brainct_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    roots = [brainct_data["cq500"], brainct_data["physionet"]]
    fit("stage1_clip.yaml", roots, "report", CLIP, "--model.text_max_length", "32")
    tags, acc = read_run(tmp_path / "runs" / "stage1")
    recall = {f"val/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert recall | {"train/loss", "train/logit_scale", "train/grad_norm", "val/loss"} <= set(tags["scalars"])
    # 4 validation pairs: every true match is within the top 5
    assert acc.Scalars("val/i2t_R@5")[-1].value == 1.0
    metrics, _ = hparams_of(acc)
    assert metrics == ["val/loss", "val/i2t_R@1", "val/t2i_R@1"]
