"""Training options of `m3d-lit fit` that LightningCLI would otherwise take in a way a user does not expect."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO

from m3d_lit.cli import main
from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint

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
    checkpoint = load_checkpoint(tmp_path / "runs/stage1/version_0/checkpoints/last.ckpt")
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


@pytest.mark.parametrize(
    ("flags", "wanted"),
    [
        (["--optimizer.lr", "5e-4"], {"class_path": "torch.optim.AdamW", "lr": 5e-4, "weight_decay": 0.0}),
        # the recipe's class again: its other arguments stay (AdamW's own default weight decay is 0.01)
        (["--optimizer", "AdamW", "--optimizer.lr", "5e-4"],
         {"class_path": "torch.optim.AdamW", "lr": 5e-4, "weight_decay": 0.0}),
        (["--optimizer=SGD", "--optimizer.lr=0.1"], {"class_path": "torch.optim.SGD", "lr": 0.1, "momentum": 0.0}),
    ],
)  # fmt: skip
def test_optimizer_flags_set_the_task_optimizer_as_print_config_shows(
    flags: list[str],
    wanted: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import yaml

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _fit_stage1([tmp_path], *flags, "--print_config")
    assert exit_.value.code in (0, None)
    optimizer = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optimizer"]
    shown = {"class_path": optimizer["class_path"], **optimizer["init_args"]}
    assert {key: shown[key] for key in wanted} == wanted
    assert not any(tmp_path.iterdir())


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


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"llm": {"num_hiden_layers": 2}}, r"llm\.num_hiden_layers is not a setting \(did you mean num_hidden_layers\?\); llm takes: .*\bnum_hidden_layers\b.*"),
        ({"vision": {"numlayers": 1}}, r"vision\.numlayers is not a setting \(did you mean num_layers\?\); vision takes: cls_token, dropout_rate, hidden_size, in_channels, mlp_dim, num_heads, num_layers, qkv_bias"),
        ({"text": {"hiden_size": 64}}, r"text\.hiden_size is not a setting \(did you mean hidden_size\?\); text takes: .*"),
        ({"perceiver": {"pool": 2, "projection": "mlp"}}, r"perceiver\.projection is not a setting; perceiver takes: depth, name, pool, proj"),
        ({"lora": {"rank": 8}}, r"lora\.rank is not a setting; lora takes: alpha, dropout, r, target_modules"),
        ({"llm": 2}, r"llm takes a mapping of settings, got 2"),
        ({"visoin": {}}, r"unknown keys \['visoin'\]; known: .*"),
    ],
)  # fmt: skip
def test_override_that_names_no_setting_is_refused_with_the_valid_names(
    overrides: dict, problem: str
) -> None:
    from m3d_lit.errors import InputError
    from m3d_lit.models.presets import resolve

    with pytest.raises(InputError) as err:
        resolve("tiny", overrides)
    assert err.value.path == "overrides" and re.fullmatch(problem, err.value.problem), err.value.problem


def test_overrides_the_model_reads_are_accepted() -> None:
    from m3d_lit.models.presets import resolve

    config = resolve(
        "tiny",
        {
            "llm": {"num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 5e5},
            "vision": {"dropout_rate": 0.1},
            "perceiver": {"name": "sequence_pool", "pool": 4},
            "lora": {"target_modules": ["q_proj"]},
            "img_size": [32, 64, 64],
        },
    )
    assert config["llm"]["num_hidden_layers"] == 1 and config["perceiver"]["pool"] == 4


def test_llm_family_override_is_read_and_checked_against_that_familys_settings() -> None:
    """`llm.family` picks the transformers class (`build_causal_lm` reads it); that class's settings count."""
    from m3d_lit.errors import InputError
    from m3d_lit.models.presets import resolve

    config = resolve("tiny", {"llm": {"family": "phi3", "sliding_window": 64}})
    assert config["llm"]["family"] == "phi3" and config["llm"]["sliding_window"] == 64
    with pytest.raises(InputError, match=r"llm\.family 'gpt2' is not one of \['llama', 'phi3'\]"):
        resolve("tiny", {"llm": {"family": "gpt2"}})
    with pytest.raises(InputError, match=r"llm\.sliding_window is not a setting"):
        resolve("tiny", {"llm": {"sliding_window": 64}})


def test_fit_with_a_nested_override_typo_stops_in_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _fit_stage1([tmp_path], "--model.overrides", "{text: {num_hiden_layers: 1}}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(
        "m3d-lit fit: error: overrides: text.num_hiden_layers is not a setting (did you mean num_hidden_layers?)"
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("task", ["AlignTask", "FinetuneTask"])
def test_paper_preset_without_an_llm_is_refused_unless_asked_for(task: str) -> None:
    import m3d_lit.tasks
    from m3d_lit.errors import InputError

    with pytest.raises(InputError) as err:
        getattr(m3d_lit.tasks, task)(preset="paper")
    assert err.value.path == "llm_path"
    assert err.value.problem == (
        "the paper preset needs the pretrained LLM: pass --model.llm_path /models/Llama-2-7b-hf (null would "
        "build a random 6.7B-parameter LLM; --model.random_llm true does so on purpose)"
    )


def test_describe_and_plan_still_take_the_paper_preset_without_an_llm(capsys: pytest.CaptureFixture) -> None:
    assert main(["describe", "--preset", "paper", "--stage", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 6e9


@pytest.mark.slow
def test_fit_says_where_its_run_went_and_prints_no_library_notices(
    prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [
        "fit", "-c", "stage3", "-c", "cpu", "--model.preset", "tiny", "--model.init_from", "null",
        "--model.overrides", json.dumps({"vision": {"num_layers": 1}, "llm": {"num_hidden_layers": 1}}),
        "--data.roots", json.dumps([str(r) for r in prepared]), "--data.batch_size", "2",
        "--trainer.max_steps", "1", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    out, err = capfd.readouterr()
    shown = out + err
    assert "litlogger" not in shown and "LeafSpec" not in shown and "v_num" not in shown
    assert "was called before the ``update`` method" not in shown
    assert "Epoch 0" in shown and "Epoch 0/-" not in shown  # a run bounded by steps: no "Epoch 0/-2"
    assert "peak FLOP/s" not in shown  # no MFU advice on a CPU
    assert out.strip().splitlines()[-1] == (
        "m3d-lit fit: run runs/stage3/version_0; checkpoint runs/stage3/version_0/checkpoints/last.ckpt; "
        "logs: tensorboard --logdir runs"
    )


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_data_prepared_at_another_size_is_refused_before_the_run_writes(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from conftest import write_prepared

    root = write_prepared(tmp_path / "data" / "cq500", "cq500")  # 1 x 8 x 16 x 16 volumes
    monkeypatch.chdir(tmp_path)
    mode = ["--data.mode", "report"] if stage == "stage1" else ["--model.init_from", "null"]
    argv = [
        "fit",
        "-c",
        stage,
        "-c",
        "cpu",
        "--model.preset",
        "tiny",
        "--data.roots",
        json.dumps([str(root)]),
        *mode,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"m3d-lit fit: error: .*cq500: source 'cq500' was prepared at size \[8, 16, 16\], but the model takes "
        r"\[32, 64, 64\] \(every source of a run must be\): prepare it again with `m3d-lit prepare \.\.\. --size "
        r"32 64 64`",
        err,
    ), err
    assert not (tmp_path / "runs").exists()
