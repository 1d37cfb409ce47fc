"""`m3d-lit fit -c stage3 --help` shows the model's and data's options with the run's values, and the
few trainer options a run changes; `--help-all` is LightningCLI's full help."""

from __future__ import annotations

import pytest

from m3d_lit.cli import main
from m3d_lit.commands.lightning_help import recipe_args


def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def _value(text: str, option: str) -> str:
    """The `(default: ...)` that closes `option`'s entry."""
    entry = text.split(f"\n  {option}\n", 1)[1].split("\n  -", 1)[0]
    return " ".join(entry.split()).rsplit("(default: ", 1)[1].removesuffix(")")


def test_stage3_help_is_short_and_shows_the_model_data_and_run_options(capsys: pytest.CaptureFixture) -> None:
    text = _help(["fit", "-c", "stage3", "--help"], capsys)
    assert len(text.splitlines()) < 200  # LightningCLI's own: 547 lines, no model option
    assert "model: m3d_lit.tasks.FinetuneTask" in text
    # the recipe's values, not the class defaults (FinetuneTask's preset is tiny, its batch size 2)
    assert _value(text, "--model.preset") == "paper"
    assert _value(text, "--model.init_from") == "runs/stage2"
    assert _value(text, "--model.optimizer") == "AdamW(lr=2e-05, weight_decay=0.0)"
    assert _value(text, "--data.batch_size") == "12"
    assert _value(text, "--trainer.max_epochs") == "3"  # from trainer/common.yaml
    assert _value(text, "--trainer.logger.init_args.version") == "null"
    assert "--trainer.detect_anomaly" not in text and "--help-all" in text
    for option in ("--model.lora", "--model.gradient_checkpointing", "--data.roots", "--ckpt_path"):
        assert f"\n  {option}\n" in text


def test_the_options_given_are_the_values_shown(capsys: pytest.CaptureFixture) -> None:
    text = _help(
        ["fit", "-c", "stage3", "-c", "cpu", "--model.preset", "tiny", "--data.batch_size", "3", "-h"], capsys
    )
    assert _value(text, "--model.preset") == "tiny"
    assert _value(text, "--data.batch_size") == "3"
    assert _value(text, "--trainer.precision") == "32-true"  # the cpu preset's


def test_a_wrong_option_still_shows_the_recipes_options_and_says_what_is_wrong(
    capsys: pytest.CaptureFixture,
) -> None:
    text = _help(["fit", "-c", "stage3", "--model.nope", "3", "--help"], capsys)
    assert "the recipes' values are shown" in text and "'nope' is not accepted" in text
    assert _value(text, "--model.preset") == "paper"


def test_without_a_recipe_the_help_says_how_to_name_one(capsys: pytest.CaptureFixture) -> None:
    text = _help(["fit", "--help"], capsys)
    assert "model: no recipe names one: -c stage1|stage2|stage3" in text
    assert "do not parse" not in text and "--trainer.max_steps" in text


def test_help_all_is_lightnings_full_help(capsys: pytest.CaptureFixture) -> None:
    text = _help(["fit", "-c", "stage3", "--help-all"], capsys)
    assert "--trainer.detect_anomaly" in text and "--model.help" in text


def test_recipe_args_keep_the_recipes_and_drop_the_options() -> None:
    argv = [
        "fit",
        "-c",
        "a.yaml",
        "--config=b.yaml",
        "--data",
        "d.yaml",
        "--data.batch_size",
        "2",
        "--x",
        "1",
    ]
    assert recipe_args(argv) == ["fit", "-c", "a.yaml", "--config", "b.yaml", "--data", "d.yaml"]
    # `--data` followed by a class or a value of the data section is an option, not a recipe
    assert recipe_args(["fit", "--data", "BrainCTQADataModule"]) == ["fit"]
