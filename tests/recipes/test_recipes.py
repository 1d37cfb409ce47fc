"""The recipes in the package: names on the command line, `m3d-lit recipes`, package data, composition."""

from __future__ import annotations

import re
import sys
from importlib.resources import files
from pathlib import Path, PurePosixPath

import pytest
import yaml
from conftest import REPO

from m3d_lit.cli import main
from m3d_lit.recipes import expand_argv, find_recipe, list_recipes, recipes_root

STAGES = {1: "stage1_clip", 2: "stage2_align", 3: "stage3_finetune"}


def test_names_resolve_to_the_package_recipes_and_an_existing_path_wins(tmp_path, monkeypatch) -> None:
    root = recipes_root()
    assert find_recipe("stage3", ("stage",)) == root / "stages" / "stage3_finetune.yaml"
    assert find_recipe("stage3_finetune.yaml", ("stage",)) == root / "stages" / "stage3_finetune.yaml"
    assert find_recipe("cpu", ("stage", "trainer", "data")) == root / "stages" / "trainer" / "cpu.yaml"
    assert find_recipe("stage9", ("stage",)) is None and find_recipe("stages/x", ("stage",)) is None
    argv = ["fit", "-c", "stage1", "--config=cpu", "--data", "cq500_qa", "--data.batch_size", "2"]
    assert expand_argv(argv) == [
        "fit", "-c", str(root / "stages" / "stage1_clip.yaml"), f"--config={root / 'stages/trainer/cpu.yaml'}",
        "--data", str(root / "datamodules" / "cq500_qa.yaml"), "--data.batch_size", "2",
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage3").write_text("trainer: {max_epochs: 1}\n")
    kept = ["fit", "-c", "stage3", "--data", "BrainCTQADataModule", "-c", "missing.yaml"]
    assert expand_argv(kept) == kept  # a file named so, a class name, a missing file: left to LightningCLI


def test_recipes_command_lists_every_recipe_with_its_path(capsys) -> None:
    assert main(["recipes", "--paths"]) == 0
    out = capsys.readouterr().out
    for kind in list_recipes().values():
        for name, path in kind.items():
            assert f"  {name}" in out and str(path) in out
    assert main(["recipes", "stage2"]) == 0
    assert capsys.readouterr().out.strip() == str(recipes_root() / "stages" / "stage2_align.yaml")
    assert main(["recipes", "stage7"]) == 2
    assert "stage7: names no recipe" in capsys.readouterr().err


def test_package_data_ships_every_recipe_and_the_top_level_folders_link_to_them() -> None:
    root = Path(str(files("m3d_lit.recipes")))
    shipped = sorted(p.relative_to(root.parent).as_posix() for p in root.rglob("*.yaml"))
    assert len(shipped) >= 16 and "recipes/stages/trainer/common.yaml" in shipped
    listed = re.search(r"^m3d_lit = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    patterns = [PurePosixPath(p.strip(' "')) for p in listed.group(1).split(",")]

    def included(path: str) -> bool:  # setuptools' globs do not cross folders
        return any(
            len(p.parts) == len(PurePosixPath(path).parts) and PurePosixPath(path).match(str(p))
            for p in patterns
        )

    assert all(included(path) for path in shipped), [path for path in shipped if not included(path)]
    for name in ("stages", "datamodules"):
        assert (REPO / name).is_symlink() and (REPO / name).resolve() == (root / name).resolve()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_recipe_with_the_common_trainer_block_composes_the_old_config(
    stage, capsys, monkeypatch
) -> None:
    """What `fit -c stages/<stage>.yaml -c stages/trainer/cpu.yaml --print_config` printed before the
    shared block moved to stages/trainer/common.yaml (checked against main by hand too)."""
    monkeypatch.setattr(sys, "argv", ["m3d-lit"])
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", f"stage{stage}", "-c", "cpu", "--print_config"])
    assert done.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    name = f"stage{stage}"  # the run folders: runs/stage<N>/<run>/
    assert (trainer["max_epochs"], trainer["log_every_n_steps"]) == (3, 10)
    assert (trainer["accelerator"], trainer["precision"], trainer["num_sanity_val_steps"]) == (
        "cpu",
        "32-true",
        0,
    )
    assert trainer["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    logger = trainer["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"], logger["default_hp_metric"]) == ("runs", name, False)
    assert [p["class_path"] for p in trainer["plugins"]] == ["m3d_lit.tasks.callbacks.AtomicCheckpointIO"]
    callbacks = trainer["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in callbacks] == [
        "StageCheckpoint", "LearningRateMonitor", "StageCheckpoint", "NonFiniteGuard", "PreemptionCheckpoint",
        "ThroughputLogger",
    ]  # fmt: skip
    # no dirpath: each run's checkpoints go to its own folder, runs/stage<N>/<run>/checkpoints[/steps]
    assert callbacks[0]["init_args"]["dirpath"] is None and callbacks[0]["init_args"]["subdir"] is None
    assert callbacks[2]["init_args"]["dirpath"] is None and callbacks[2]["init_args"]["subdir"] == "steps"
