"""Every mistake a user can type gets one line and exit status 2: no traceback, no usage screen, nothing
written. Each subcommand's arguments and the training recipes' keys are tried with bad values; the data
can be the mistake too (a PhysioNet folder where only 2 of 4 scans can be read)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

from m3d_lit.cli import main

FIT = ["fit", "-c", str(REPO / "stages/stage1_clip.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
       "--model.preset", "tiny", "--data.roots", "[missing]"]  # fmt: skip
TINY = ["--preset", "tiny"]

# (argv, the one line after "m3d-lit <command>: error: ", as a regex)
CASES = {
    "synth-negative-count": (["synth", "--out", "o", "--cq500", "-1"], r"--cq500/--physionet: -1 and 64 must be >= 0"),
    "synth-flat-shape": (["synth", "--out", "o", "--shape", "0", "64", "64"], r"--shape: \(0, 64, 64\): need D, H, W >= 8 and H == W"),
    "synth-two-numbers": (["synth", "--out", "o", "--shape", "30", "64"], r"--shape: expected 3 arguments"),
    "synth-abbreviation": (["synth", "--out", "o", "--m3d", "2"], r"arguments: unrecognized arguments: --m3d 2"),
    "synth-not-a-number": (["synth", "--out", "o", "--cq500", "x"], r"--cq500: invalid int value: 'x'"),
    "synth-no-out": (["synth"], r"arguments: the following arguments are required: --out"),
    "prepare-size": (["prepare", "cq500", "--root", "raw", "--out", "o", "--size", "30", "256", "256"], r"size: \(30, 256, 256\) is not divisible by the patch size \(4, 16, 16\)"),
    "prepare-dataset": (["prepare", "mri", "--root", "raw", "--out", "o"], r"dataset: invalid choice: 'mri' \(choose from 'cq500', 'physionet', 'folder'\)"),
    "prepare-workers": (["prepare", "cq500", "--root", "raw", "--out", "o", "--workers", "0"], r"workers: 0 must be >= 1"),
    "prepare-window": (["prepare", "cq500", "--root", "raw", "--out", "o", "--window", "lung"], r"--window: invalid choice: 'lung' .*"),
    "prepare-fractions": (["prepare", "cq500", "--root", "raw", "--out", "o", "--fractions", "0.5", "0.5", "0.5"], r"--fractions: \(0\.5, 0\.5, 0\.5\) must be three non-negative numbers summing to 1"),
    "prepare-root": (["prepare", "cq500", "--root", "missing", "--out", "o"], r"missing: not a folder"),
    "describe-json": (["describe", "--overrides", "{bad"], r"--overrides: not JSON \(Expecting property name enclosed in double quotes at column 2\): '\{bad'"),
    "describe-typo": (["describe", *TINY, "--overrides", '{"llm": {"num_hiden_layers": 2}}'], r"overrides: llm\.num_hiden_layers is not a setting \(did you mean num_hidden_layers\?\); llm takes: .*"),
    "describe-stage": (["describe", "--stage", "4"], r"--stage: invalid choice: 4 \(choose from 1, 2, 3\)"),
    "describe-preset": (["describe", "--preset", "huge"], r"--preset: invalid choice: 'huge' .*"),
    "plan-micro-batch": (["plan", "--micro-batch", "0"], r"--micro-batch: 0 must be >= 1"),
    "plan-gpu-mem": (["plan", "--gpu-mem", "-1"], r"--gpu-mem/--reserve: -1\.0 and 1\.0 GiB: the GPU memory must exceed the reserve, which is >= 0"),
    "plan-seg-share": (["plan", "--seg-share", "2"], r"--seg-share: 2\.0 must be in \[0, 1\]"),
    "plan-width-divisor": (["plan", "--width-divisor", "3"], r"--width-divisor: 3 must divide the LLM widths \[4096, 32, 11008\]"),
    "plan-trainable": (["plan", *TINY, "--trainable", '{"vision": "half"}'], r"trainable: \['vision'\] = 'half' is not valid; allowed: \('frozen', 'full'\)"),
    "plan-lora-dropout": (["plan", "--lora-dropout", "2"], r"--lora-dropout: 2\.0 must be in \[0, 1\)"),
    "plan-pool": (["plan", *TINY, "--overrides", '{"perceiver": {"pool": 3}}'], r"--overrides/--trainable: the model cannot be built with these values: patch grid \(8, 4, 4\) is not divisible by the pool kernel \(3, 3, 3\)"),
    "plan-model-not-lamed": (["plan", "--model", "raw"], r"--model: raw is not an M3D-LaMed directory: its config\.json should name model_type lamed_llama or lamed_phi3 \(for a preset, use --preset\)"),
    "describe-model-missing": (["describe", "--model", "nope"], r"--model: nope is not a folder \(give an M3D-LaMed directory such as /models/M3D-LaMed-Phi-3-4B\)"),
    "score-missing": (["score", "missing.jsonl"], r"missing\.jsonl: no such file"),
    "eval-batch-size": (["eval", "--checkpoint", "c.ckpt", "--data", "d.jsonl", "--out", "o", "--batch-size", "0"], r"--batch-size: 0 must be at least 1"),
    "eval-blank-masks": (["eval", "--checkpoint", "c.ckpt", "--data", "d.jsonl", "--out", "o", "--blank-images", "--save-masks"], r"--save-masks: a --blank-images run's masks are not predictions for the question's scan: save masks without the control"),
    "eval-swap-masks": (["eval", "--checkpoint", "c.ckpt", "--data", "d.jsonl", "--out", "o", "--swap-images", "--save-masks"], r"--save-masks: a --swap-images run's masks are not predictions for the question's scan: save masks without the control"),
    "eval-checkpoint": (["eval", "--checkpoint", "missing.ckpt", "--data", "d.jsonl", "--out", "o"], r"missing\.ckpt: checkpoint not found \(a \.ckpt file, a run or stage folder .*"),
    "ask-tokens": (["ask", "--checkpoint", "c.ckpt", "--volume", "v.npy", "--question", "q", "--max-new-tokens", "0"], r"--max-new-tokens: 0 must be at least 1"),
    "ask-volume": (["ask", "--checkpoint", "c.ckpt", "--volume", "missing.npy", "--question", "q"], r"missing\.npy: does not exist"),
    "export-dtype": (["export", "--checkpoint", "c.ckpt", "--out", "o", "--dtype", "int8"], r"--dtype: invalid choice: 'int8' .*"),
    "export-checkpoint": (["export", "--checkpoint", "missing.ckpt", "--out", "o"], r"missing\.ckpt: checkpoint not found \(a \.ckpt file, a run or stage folder .*"),
    "bench-tasks": (["bench", "--out", "o", "--tasks", "nope"], r"--tasks: unknown task 'nope'; choose all or from .*"),
    "bench-batch-size": (["bench", "--out", "o", "--batch-size", "0"], r"--batch-size/--max-new-tokens/--limit: 0, 64 and None must be >= 1"),
    "fit-not-a-number": ([*FIT, "--trainer.max_steps", "abc"], r"--trainer\.max_steps: expected int\. Got value: abc"),
    "fit-unknown-option": ([*FIT, "--trainer.max_stepz", "3"], r"configuration: unrecognized arguments: --trainer\.max_stepz 3 \(did you mean --trainer\.max_steps or --trainer\.max_time\?\)"),
    "fit-no-training-data": (["fit", "-c", "stage3", "-c", "cpu", "--model.preset", "tiny", "--model.init_from", "null", "--data.roots", "[nope]"], r"nope: has no training samples \(no train split, or an empty one\): give the folder `m3d-lit prepare` wrote \(its qa_train\.jsonl, or reports\.jsonl for mode report\)"),
    "fit-resume-nothing": ([*FIT, "--ckpt_path", "last"], r"--ckpt_path: last: there is no checkpoint to resume in runs/stage1\w*: leave --ckpt_path out to start a new run"),
    "fit-stage1-random-bert": ([*FIT, "--model.preset", "paper"], r"--model\.text_path: the paper preset needs a pretrained text encoder: pass --model\.text_path /models/bert-base-uncased \(null would train against a random BERT that knows no word; --model\.random_text true does so on purpose\)"),
    "fit-abbreviated-option": ([*FIT, "--trainer.max_steps", "1", "--trainer.max_step", "5"], r"configuration: unrecognized arguments: --trainer\.max_step 5 \(did you mean --trainer\.max_steps or --trainer\.max_time\?\)"),
    "fit-model-lr": ([*FIT, "--model.lr", "1e-4"], r"--model: Problem with given class_path 'm3d_lit\.tasks\.ClipTask': Option 'lr' is not accepted \(the optimizer's settings: --model\.optimizer\.lr or --optimizer\.lr\)"),
    "fit-unknown-model-key": ([*FIT, "--model.warmup", "0.1"], r"--model: Problem with given class_path 'm3d_lit\.tasks\.ClipTask': Option 'warmup' is not accepted \(did you mean warmup_ratio\?\)"),
    "fit-config-file": ([*FIT, "-c", "missing.yaml"], r"-c/--config: File does not exist: '.*missing\.yaml'"),
    "fit-precision": ([*FIT, "--trainer.precision", "99"], r"--trainer\.precision: expected one of 64, 32, 16 or .*; got 99"),
    "fit-warmup": ([*FIT, "--model.warmup_ratio", "2"], r"--model\.warmup_ratio: 2\.0 must be in \[0, 1\)"),
    "fit-preset": ([*FIT, "--model.preset", "huge"], r"preset: unknown preset 'huge'; choose one of \['paper', 'small', 'tiny'\]"),
    "fit-overrides": ([*FIT, "--model.overrides", "{text: {num_hiden_layers: 1}}"], r"overrides: text\.num_hiden_layers is not a setting \(did you mean num_hidden_layers\?\); .*"),
    "fit-trainable": ([*FIT, "--model.trainable", "{vision: half}"], r"--model.trainable: \['vision'\] = 'half': keys vision\|text\|projections, values .*"),
    "fit-lr-scale": ([*FIT, "--model.lr_scale", "{perceiver: 2.0}"], r"--model.lr_scale: names \['perceiver'\], which have no trainable weights here; trainable: \[.*\]"),
    "fit-batch-size": ([*FIT, "--data.batch_size", "0"], r"--data: batch_size must be >= 1 and num_workers >= 0, got 0, 0"),
    "fit-lr-scheduler": ([*FIT, "--lr_scheduler", "torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler.gamma", "0.9"], r"--lr_scheduler: the task schedules the learning rate itself .*"),
    "fit-ckpt-path": ([*FIT, "--ckpt_path", "missing.ckpt"], r"missing\.ckpt: --ckpt_path: checkpoint not found \(or use --ckpt_path last to resume the newest\)"),
    "fit-init-from": ([*FIT, "--model.init_from", "missing.ckpt"], r"missing\.ckpt: --model\.init_from: checkpoint not found .*"),
    "recipe-model-key": ([*FIT, "-c", "model_key.yaml"], r"--model: Problem with given class_path 'm3d_lit\.tasks\.ClipTask': Option 'warmup_ratoi' is not accepted \(did you mean warmup_ratio\?\)"),
    "recipe-trainer-key": ([*FIT, "-c", "trainer_key.yaml"], r"configuration: Subcommand 'fit' does not accept option 'trainer\.max_stepz'"),
    "recipe-yaml": ([*FIT, "-c", "broken.yaml"], r"configuration: Problems parsing config: while parsing a flow sequence .*"),
    "fit-init-from-zero": ([*FIT, "--model.init_from", "zero.ckpt"], r"zero\.ckpt: --model\.init_from: is a DeepSpeed ZeRO checkpoint folder \(tag 'checkpoint'\), not one file: convert it with `python -c .*convert\('zero\.ckpt', 'zero\.fp32\.ckpt'\)\"` \(needs `pip install deepspeed`\), then pass zero\.fp32\.ckpt"),
    "eval-zero": (["eval", "--checkpoint", "zero.ckpt", "--data", "d.jsonl", "--out", "o"], r"zero\.ckpt: is a DeepSpeed ZeRO checkpoint folder .*then pass zero\.fp32\.ckpt"),
    "export-zero": (["export", "--checkpoint", "zero.ckpt", "--out", "o"], r"zero\.ckpt: is a DeepSpeed ZeRO checkpoint folder .*then pass zero\.fp32\.ckpt"),
    "fit-data-root": (FIT, r"missing/reports\.jsonl: is missing \(report mode reads it\): run `m3d-lit prepare` for this folder"),
    "fit-recipe-typo": ([*FIT, "-c", "gpu2"], r"-c: 'gpu2' is neither a file nor a recipe: did you mean gpu1 or cpu\? \(`m3d-lit recipes` lists the recipes\)"),
    "fit-data-name-typo": ([*FIT, "--data", "cq500"], r"--data: 'cq500' is neither a file nor a recipe: did you mean cq500_qa\? \(`m3d-lit recipes` lists the recipes\)"),
    "fit-gpu-preset-on-cpu": ([*FIT, "-c", "gpu1"], r"--trainer\.accelerator: 'gpu' \(set by a GPU preset: .*\) needs a CUDA GPU, and torch sees none here: use -c cpu on this machine, or run on a GPU machine"),
    "fit-nvlink-on-cpu": ([*FIT, "-c", "ddp_nvlink"], r"--trainer\.accelerator: 'gpu' .* needs a CUDA GPU, .*"),
    "fit-fsdp-one-device": ([*FIT, "-c", "fsdp", "--trainer.accelerator", "cpu", "--trainer.devices", "1"], r"--trainer\.strategy: ShardedStrategy shards the model over processes, and this run has one \(num_nodes 1 x devices 1\): use -c gpu1 on one GPU, -c cpu on a CPU"),
    "fit-nodes-without-launcher": ([*FIT, "-c", "multinode"], r"--trainer\.num_nodes: 2 machines, but nothing says which one this is: start each with torchrun --nnodes 2 --node-rank R \.\.\., with srun under SLURM, or set NODE_RANK, MASTER_ADDR and MASTER_PORT \(README: Train on GPUs\)"),
}  # fmt: skip
# launcher variables of a world that the run's num_nodes x devices disagrees with
LAUNCHED = {
    "fit-torchrun-world": (
        {"TORCHELASTIC_RUN_ID": "none", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
         "WORLD_SIZE": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
        r"--trainer\.num_nodes: 1 x devices 1 disagrees with torchrun, which started 2 processes, 1 per machine: "
        r"pass --trainer\.num_nodes 2 and --trainer\.devices 1 \(or torchrun --nproc-per-node 1\)",
    ),
    "fit-slurm-nodes": (
        {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "node1"},
        r"--trainer\.num_nodes: disagrees with SLURM: You set `num_nodes=1` in Lightning, but the number of nodes "
        r"configured in SLURM `--nodes=2` does not match\. HINT: Set `num_nodes=2`\.",
    ),
}  # fmt: skip


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _lightning_logs_to_this_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's log handlers keep the stderr of the test that imported Lightning, closed by now
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)


@pytest.mark.parametrize("name", [*CASES, *LAUNCHED])
def test_mistake_gets_one_line_and_exit_2_and_writes_nothing(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if name in LAUNCHED:
        variables, problem = LAUNCHED[name]
        argv = FIT
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
    else:
        argv, problem = CASES[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    np.save(tmp_path / "v.npy", np.zeros((4, 16, 16), np.float32))
    (tmp_path / "c.ckpt").write_bytes(b"never read: the argument check comes first")
    (tmp_path / "model_key.yaml").write_text("model:\n  init_args:\n    warmup_ratoi: 0.1\n")
    (tmp_path / "trainer_key.yaml").write_text("trainer:\n  max_stepz: 3\n")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "zero.ckpt" / "checkpoint").mkdir(parents=True)  # the zero2 preset's last.ckpt
    (tmp_path / "zero.ckpt" / "latest").write_text("checkpoint")
    (tmp_path / "zero.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed")
    before = _files(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    # the last line is the error; Lightning may log a line or two before it (the seed, the devices)
    lines = err.strip().splitlines()
    assert sum("error:" in line for line in lines) == 1
    head = f"m3d-lit {argv[0]}: error: "
    assert lines[-1].startswith(head) and re.fullmatch(problem, lines[-1][len(head) :]), lines[-1]
    assert _files(tmp_path) == before


def _physionet_half_readable(root: Path) -> Path:
    """Four PhysioNet patients with 5 labelled slices each; the scans of two are cut short (unreadable)."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
            "No_Hemorrhage,Fracture_Yes_No"]  # fmt: skip
    for number in range(49, 53):
        volume = np.random.default_rng(number).integers(-50, 90, (16, 16, 5)).astype(np.int16)
        scan = root / "ct_scans" / f"{number:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), scan)
        nib.save(
            nib.Nifti1Image(np.zeros(volume.shape, np.uint8), np.eye(4)), root / "masks" / f"{number:03d}.nii"
        )
        if number % 2:
            scan.write_bytes(scan.read_bytes()[:100])
        rows += [f"{number},{i},0,0,0,0,0,1,{number % 2}" for i in range(1, 6)]
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("\n".join(rows) + "\n")
    return root


def test_prepare_on_a_mostly_unreadable_folder_says_what_it_prepared_and_which_option_to_change(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _physionet_half_readable(tmp_path / "raw")
    out = tmp_path / "out"
    argv = ["prepare", "physionet", "--root", str(root), "--out", str(out), "--size", "4", "16", "16"]
    with pytest.warns(UserWarning, match="2 labelled id"):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
    assert err.splitlines()[-1] == (
        "m3d-lit prepare: error: --fractions: 2 of 4 scans prepared (2 skipped, see skipped.csv); 2 labelled "
        "patients are too few for train/val/test fractions (0.7, 0.1, 0.2): val and test take 1 and 1 (rounded "
        "up), leaving none for train; give val and test smaller shares, e.g. --fractions 1 0 0 puts every "
        "patient in train"
    )
    assert len((tmp_path / "out" / "skipped.csv").read_text().splitlines()) == 3  # header + the 2 unread
    with pytest.warns(UserWarning, match="2 labelled id"):
        assert main([*argv, "--fractions", "1", "0", "0"]) == 0  # the images prepared above are reused
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert {k: splits[k] for k in ("train", "val", "test")} == {
        "train": ["050", "052"],
        "val": [],
        "test": [],
    }
