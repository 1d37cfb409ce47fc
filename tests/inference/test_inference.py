"""m3d_lit.inference: the bundle every checkpoint carries (the mix recipe's windows per source), the one
loader of every checkpoint kind, and the Predictor (visual tokens once per scan, identical answers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LAMED, REPO, write_prepared

from m3d_lit.cli import main
from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import Bundle, SourcePreprocessing, TokenizerRecord
from m3d_lit.inference.checkpoints import read_checkpoint, resolve_checkpoint
from m3d_lit.inference.loading import load_model
from m3d_lit.inference.predictor import Predictor, Request


def _prepared(root: Path, dataset: str, window: str, size: list[int]) -> Path:
    write_prepared(root, dataset)
    (root / "prepare.json").write_text(json.dumps({"dataset": dataset, "size": size, "window": window}))
    return root


def _mix(tmp_path: Path, m3d_vqa_data: dict, m3d_seg_data: dict, physionet_size: list[int]) -> Path:
    """The mix recipe's shape (two brain-CT folders, M3D-VQA, M3D-Seg) on tiny files."""
    cq500 = _prepared(tmp_path / "cq500", "cq500", "brain", [8, 16, 16])
    physionet = _prepared(tmp_path / "physionet", "physionet", "subdural", physionet_size)
    brain = "m3d_lit.data.datamodules.BrainCTQADataModule"
    sources = {
        "cq500": {"class_path": brain, "init_args": {"roots": [str(cq500)], "flip_axes": []}},
        "physionet": {"class_path": brain, "init_args": {"roots": [str(physionet)], "flip_axes": []}},
        "m3d_vqa": {"class_path": "m3d_lit.data.datamodules.M3DVQADataModule",
                    "init_args": {"root": str(m3d_vqa_data["root"]), "train_csv": str(m3d_vqa_data["train_csv"])}},
        "m3d_seg": {"class_path": "m3d_lit.data.datamodules.M3DSegDataModule",
                    "init_args": {"root": str(m3d_seg_data["root"]), "datasets": ["0000"], "test_split": None}},
    }  # fmt: skip
    mix = {"class_path": "m3d_lit.data.datamodules.MixDataModule",
           "init_args": {"sources": sources, "weights": dict.fromkeys(sources, 1.0), "batch_size": 2}}  # fmt: skip
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps(mix))
    return path


def _fit_mix(tmp_path: Path, mix: Path) -> int:
    argv = [
        "fit", "-c", str(REPO / "stages/stage3_finetune.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "--data", str(mix), "--model.preset", "tiny", "--model.overrides", json.dumps(LAMED),
        "--model.init_from", "null", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return main(argv)


@pytest.mark.slow
def test_mix_checkpoint_records_each_sources_window_and_eval_refuses_another(
    tmp_path: Path, m3d_vqa_data: dict, m3d_seg_data: dict, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _fit_mix(tmp_path, _mix(tmp_path, m3d_vqa_data, m3d_seg_data, [8, 16, 16])) == 0
    run = resolve_checkpoint(tmp_path / "runs" / "stage3")
    bundle = Bundle.from_dict(read_checkpoint(run.path)["m3d_lit"]["bundle"], run.path)
    size = (8, 16, 16)
    assert bundle.preprocessing == {
        "cq500": SourcePreprocessing(size, "brain"),
        "physionet": SourcePreprocessing(size, "subdural"),
        "m3d_vqa": SourcePreprocessing(size, "none"),  # M3D-Data ships its volumes min-maxed
        "m3d_seg": SourcePreprocessing(size, "none"),
    }
    assert bundle.kind == "lamed" and bundle.lora is not None and len(bundle.data or "") == 16
    assert bundle.version and bundle.task == "m3d_lit.tasks.finetune.FinetuneTask"
    # a new scan: its source says how to read it; without one, the differing windows are named
    assert bundle.scan_window("physionet") == "subdural"
    with pytest.raises(InputError, match=r"cq500: brain, m3d_seg: none, m3d_vqa: none, physionet: subdural"):
        bundle.scan_window()
    # eval: the physionet test data again, but prepared with the brain window: refused in one line
    other = Path(shutil.copytree(tmp_path / "physionet", tmp_path / "physionet_brain"))
    (other / "prepare.json").write_text(
        json.dumps({"dataset": "physionet", "size": [8, 16, 16], "window": "brain"})
    )
    argv = [
        "eval",
        "--checkpoint",
        "runs/stage3",
        "--data",
        str(other),
        "--out",
        "eval",
        "--max-new-tokens",
        "2",
    ]
    capsys.readouterr()  # the fit's own output
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "physionet_brain/qa_test.jsonl: was prepared with window 'brain'" in err
    assert (
        "this model reads physionet scans with window 'subdural'" in err and not (tmp_path / "eval").exists()
    )


@pytest.mark.slow
def test_mix_whose_sources_disagree_in_size_is_refused_at_fit(
    tmp_path: Path, m3d_vqa_data: dict, m3d_seg_data: dict, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _fit_mix(tmp_path, _mix(tmp_path, m3d_vqa_data, m3d_seg_data, [8, 32, 32])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Lightning's INFO lines
    assert (
        err.startswith("m3d-lit fit: error: ")
        and "source 'physionet' was prepared at size [8, 32, 32]" in err
    )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_one_source_with_two_windows_is_refused(tmp_path: Path) -> None:
    from m3d_lit.data.datamodules import BrainCTQADataModule

    roots = [_prepared(tmp_path / n, "cq500", w, [8, 16, 16]) for n, w in (("a", "brain"), ("b", "bone"))]
    with pytest.raises(InputError, match=r"source 'cq500' comes with two preprocessings"):
        _ = BrainCTQADataModule([str(r) for r in roots]).preprocessing


def test_bundle_round_trip_and_a_record_of_another_format(tmp_path: Path) -> None:
    bundle = Bundle("lamed", {"img_size": [8, 16, 16]}, TokenizerRecord(None, 10, "ab"),
                    preprocessing={"cq500": SourcePreprocessing((8, 16, 16), "brain")})  # fmt: skip
    assert Bundle.from_dict(json.loads(json.dumps(bundle.to_dict())), "x") == bundle
    with pytest.raises(InputError, match="another format"):
        Bundle.from_dict({**bundle.to_dict(), "format": 99}, "x")
    assert bundle.scan_window() == "brain"
    with pytest.raises(InputError, match="'ct_ich' is not a training source of this model \\(cq500\\)"):
        bundle.scan_window("ct_ich")


@pytest.mark.slow
def test_a_checkpoint_without_a_bundle_loads_and_says_what_is_assumed(
    stage3_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = read_checkpoint(stage3_checkpoint)
    del checkpoint["m3d_lit"]["bundle"]  # as an m3d-lit checkpoint written before bundles
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old, new = load_model(tmp_path / "old.ckpt"), load_model(stage3_checkpoint)
    assert any("older m3d-lit without a model record" in note for note in old.notes)
    assert any("scans are read with 'brain' (assumed)" in note for note in old.notes)
    state = new.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in old.model.state_dict().items())
    assert old.bundle.lora == new.bundle.lora and old.bundle.config == new.bundle.config


def test_a_stage1_checkpoint_given_to_eval_is_one_line(tmp_path: Path, capsys) -> None:
    from conftest import CLIP

    from m3d_lit.tasks import ClipTask

    task = ClipTask(preset="tiny", overrides=CLIP)
    task.configure_model()
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "stage1.ckpt")
    root = write_prepared(tmp_path / "data", "cq500")
    argv = [
        "eval",
        "--checkpoint",
        str(tmp_path / "stage1.ckpt"),
        "--data",
        str(root),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and "stage1.ckpt: is a stage-1 (CLIP) model: it cannot answer questions" in err
    )


def test_visual_tokens_once_per_scan_and_the_same_answers_one_at_a_time() -> None:
    """Six questions about two scans in batches of 4: each scan encoded once (also across the batch
    boundary), and in float64 every answer and P(Yes) equals the one asked alone."""
    from m3d_lit.models.build import build_lamed

    torch.manual_seed(0)
    model = build_lamed("tiny", LAMED).eval().double()
    encoded: list[int] = []
    encode = model.encode_images
    model.encode_images = lambda images: encoded.append(len(images)) or encode(images)
    scans = [torch.rand(1, 8, 16, 16, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    questions = ["Is there a fracture?", "Segment the hemorrhage.", "Which side is the bleed on?"]
    requests = [Request(q, scan, f"{i}:{q}") for i, scan in enumerate(scans) for q in questions]
    predictor = Predictor(model, max_new_tokens=8)
    together = list(predictor.predict(requests, batch_size=4))
    assert encoded == [2]  # batch 1: scans 1 and 2; batch 2: scan 2 again, kept from batch 1
    alone = [predictor.answer([r])[0] for r in requests]
    assert [p.text for p in together] == [p.text for p in alone]
    # float64: the batch reorders sums only (~1e-16 relative), far below the 1e-9 allowed here
    for a, b in zip(together, alone):
        assert (a.p_yes is None) == (b.p_yes is None) == (not a.request.question.startswith("Is"))
        assert a.p_yes is None or abs(a.p_yes - b.p_yes) < 1e-9


def test_eval_out_with_an_earlier_result_is_refused_or_replaced_whole(tmp_path: Path, capsys) -> None:
    from m3d_lit.commands.arguments import check_out_folder
    from m3d_lit.commands.evaluate import RESULT_FILES

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match=r"holds an earlier result \(metrics.json\): pass --overwrite"):
        check_out_folder(out, False, RESULT_FILES)
    check_out_folder(out, True, RESULT_FILES)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files \\(notes.txt\\), not an earlier result"):
        check_out_folder(tmp_path / "mine", True, RESULT_FILES)
