"""Every bad input of issue 8, with the exact message it gets (`<file>: <problem>`).

Each case builds the bad file in a temporary folder and runs the code a user's command runs on it. The
message must name the file and the problem; the full text is pinned here so the issue's closing note
can quote it. Finer variants of several cases live beside their reader (test_io, test_labels,
test_prepare, test_datasets, test_datamodules).
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from m3d_lit.commands import synth
from m3d_lit.data import io, synthetic
from m3d_lit.data.prepare import prepare_volumes
from m3d_lit.data.sources.cq500 import CQ500_FINDINGS, CQ500_READERS, read_cq500_reads
from m3d_lit.errors import InputError

SMALL = {"vision": {"num_layers": 1}, "llm": {"num_hidden_layers": 1}}
VISION_ONLY = {"vision": {"num_layers": 1}}  # with llm_path: the LLM's sizes are its directory's
CQ500_HEADER = ["name", "Category", *[f"{r}:{f}" for r in CQ500_READERS for f in CQ500_FINDINGS]]
NUMBER = r"-?[0-9.]+"


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _series(folder: Path, depth: int = 6) -> Path:
    hu = np.full((depth, 16, 16), 40, np.int16)
    synthetic.write_ct_series(
        folder, hu, (5.0, 1.0, 1.0), "CT Plain", {"n": 1, "seed": 0, "intercept": -1024.0}
    )
    return folder


def _reads(path: Path, rows: list[list[str]], text: Callable[[str], str] = lambda s: s) -> Path:
    path.write_bytes(text("\n".join(",".join(r) for r in rows) + "\n").encode("utf-8"))
    return path


def _row(name: str, value: str = "0") -> list[str]:
    return [name, "B1", *[value] * (len(CQ500_HEADER) - 2)]


def _physionet(root: Path, slices: int, nifti: np.ndarray, patients: int = 1) -> Path:
    """A PhysioNet CT-ICH folder: patients 049, 050, ... with the same NIfTI and `slices` labelled slices."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    header = "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No"
    rows = []
    for number in range(49, 49 + patients):
        _nifti(root / "ct_scans" / f"{number:03d}.nii", nifti)
        _nifti(root / "masks" / f"{number:03d}.nii", np.zeros(nifti.shape, np.uint8))
        rows += [f"{number},{i},0,0,0,0,0,1,0" for i in range(1, slices + 1)]
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("\r\n".join([header, *rows]) + "\r\n")
    return root


def _skip_reason(root: Path, out: Path) -> Callable[[], None]:
    """Run `prepare` (not strict): the scan must be listed in skipped.csv; raise its reason to compare."""

    def run() -> None:
        result = prepare_volumes("physionet", root, out, size=(4, 16, 16), progress=False)
        assert not result.ids and len(result.skipped) == 1
        sid, where, reason = result.skipped[0]
        assert (out / "skipped.csv").read_text().splitlines()[1].startswith(f"{sid},{where},")
        raise InputError(root / where, reason)

    return run


# -- the cases: (tmp_path) -> (the call, the file it must name, the exact problem as a regex) ----------


def truncated_nii_gz(tmp: Path):
    good = _nifti(tmp / "good.nii.gz", np.zeros((8, 8, 4), np.int16)).read_bytes()
    (tmp / "scan.nii.gz").write_bytes(good[: len(good) // 2])
    return lambda: io.read_nifti(tmp / "scan.nii.gz"), tmp / "scan.nii.gz", r"cannot read NIfTI \(.+\)"


def nifti_wrong_header(tmp: Path):
    data = bytearray(gzip.decompress(_nifti(tmp / "g.nii.gz", np.zeros((8, 8, 4), np.int16)).read_bytes()))
    data[42:44] = (100).to_bytes(2, "little")  # dim[1] = 100: the header promises more voxels than stored
    (tmp / "scan.nii").write_bytes(bytes(data))
    problem = r"cannot read NIfTI \(OSError: Expected 6400 bytes, got 512 bytes from .+\n - could the file be damaged\?\)"
    return lambda: io.read_nifti(tmp / "scan.nii"), tmp / "scan.nii", problem


def dicom_without_preamble(tmp: Path):
    series = _series(tmp / "series")
    target = series / "CT000002.dcm"
    target.write_bytes(target.read_bytes()[132:])
    problem = r"not a DICOM file \(no 128-byte preamble and 'DICM' prefix\)"
    return lambda: io.read_dicom_series(series), target, problem


def series_missing_slice(tmp: Path):
    series = _series(tmp / "series")
    (series / "CT000002.dcm").unlink()
    problem = (
        rf"missing slice\(s\): gap of 10\.00 mm after position {NUMBER} mm where slices are 5\.00 mm apart"
    )
    return lambda: io.read_dicom_series(series), series, problem


def mixed_slice_sizes(tmp: Path):
    series = _series(tmp / "series")
    ds = pydicom.dcmread(series / "CT000003.dcm")
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.save_as(series / "CT000003.dcm")
    return (
        lambda: io.read_dicom_series(series),
        series,
        r"mixed slice sizes \[\(8, 8\), \(16, 16\)\] in one series",
    )


def volume_of_nan(tmp: Path):
    path = _nifti(tmp / "nan.nii", np.full((4, 4, 4), np.nan, np.float32))
    return lambda: io.read_nifti(path), path, r"volume holds 64 NaN/inf values of 64"


def volume_of_inf(tmp: Path):
    path = _nifti(tmp / "inf.nii", np.where(np.eye(4)[None] > 0, np.inf, 0).astype(np.float32))
    return lambda: io.read_nifti(path), path, r"volume holds 4 NaN/inf values of 16"


def constant_volume(tmp: Path):
    root = _physionet(tmp / "raw", 4, np.full((16, 16, 4), 40, np.int16))
    problem = r"constant volume \(no contrast after windowing\)"
    return _skip_reason(root, tmp / "out"), root / "ct_scans" / "049.nii", problem


def image_2d_where_3d_expected(tmp: Path):
    path = _nifti(tmp / "flat.nii", np.zeros((8, 8), np.int16))
    return lambda: io.read_nifti(path), path, r"expected a 3D volume, got shape \(8, 8\)"


def single_slice_scan(tmp: Path):
    root = _physionet(
        tmp / "raw", 1, np.random.default_rng(0).integers(-50, 90, (16, 16, 1)).astype(np.int16)
    )
    problem = r"a single 2D slice \(shape \(1, 16, 16\)\), expected a 3D volume"
    return _skip_reason(root, tmp / "out"), root / "ct_scans" / "049.nii", problem


def reads_missing_column(tmp: Path):
    drop = CQ500_HEADER.index("R2:SDH")
    rows = [[c for i, c in enumerate(r) if i != drop] for r in (CQ500_HEADER, _row("CQ500-CT-1"))]
    path = _reads(tmp / "reads.csv", rows)
    return lambda: read_cq500_reads(path), path, r"missing column\(s\) R2:SDH"


def reads_duplicate_scan(tmp: Path):
    path = _reads(
        tmp / "reads.csv", [CQ500_HEADER, _row("CQ500-CT-1"), _row("CQ500-CT-2"), _row("CQ500-CT-1")]
    )
    return lambda: read_cq500_reads(path), path, r"line 4: duplicate scan name CQ500-CT-1 \(first on line 2\)"


def reads_value_not_0_1(tmp: Path):
    path = _reads(tmp / "reads.csv", [CQ500_HEADER, _row("CQ500-CT-1", "2")])
    return lambda: read_cq500_reads(path), path, r"line 2, column R1:ICH: value '2' is not 0 or 1"


def physionet_slice_count_mismatch(tmp: Path):
    from m3d_lit.data.qa import write_qa

    volume = np.random.default_rng(0).integers(-50, 90, (16, 16, 5)).astype(np.int16)
    root = _physionet(tmp / "raw", 3, volume, patients=3)
    out = tmp / "out"

    def run() -> None:
        result = prepare_volumes("physionet", root, out, size=(4, 16, 16), progress=False)
        write_qa("physionet", root, out, result.ids)

    problem = r"patient 049: 3 slices labelled, the NIfTI has 5"
    return run, root / "hemorrhage_diagnosis_raw_ct.csv", problem


def m3d_vqa_empty_answer(tmp: Path):
    from m3d_lit.data.records import read_m3d_vqa

    np.save(tmp / "a.npy", np.zeros((1, 4, 16, 16), np.float32))
    header = "Image Path,Text,Question Type,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer Choice"
    path = tmp / "M3D_VQA_train.csv"
    path.write_text(f"{header}\na.npy,report,3,What organ?,brain,liver,lung,heart,,B\n")
    return lambda: read_m3d_vqa(path, tmp, "open"), path, r"row at line 2 has empty \['Answer'\]"


def qa_line_not_json(tmp: Path):
    from m3d_lit.data.datasets import read_qa_jsonl

    path = tmp / "qa_train.jsonl"
    line = {"id": "a", "image": "images/a.npy", "question": "q?", "answer": "Yes.", "kind": "open"}
    path.write_text(json.dumps(line) + "\n{'id': 'b'\n")
    return (
        lambda: read_qa_jsonl(path),
        path,
        r"line 2 is not JSON: Expecting property name enclosed in double quotes \(column 2\)",
    )


def _stage2_checkpoint(tmp: Path, overrides: dict, preset_name: str | None = None) -> Path:
    from m3d_lit.tasks import AlignTask

    task = AlignTask(preset="tiny", overrides=overrides)
    task.configure_model()
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    if preset_name:  # a checkpoint of another preset, recorded as such (building `small` takes minutes here)
        checkpoint["m3d_lit"]["base"]["preset"] = preset_name
    torch.save(checkpoint, tmp / "stage2.ckpt")
    return tmp / "stage2.ckpt"


def checkpoint_of_another_preset(tmp: Path):
    from m3d_lit.tasks import FinetuneTask

    path = _stage2_checkpoint(tmp, SMALL, preset_name="small")
    task = FinetuneTask(preset="tiny", overrides=SMALL)
    task.configure_model()
    return lambda: task.load_init_weights(path), path, r"was made with preset 'small'; this model uses 'tiny'"


def checkpoint_of_another_configuration(tmp: Path):
    from m3d_lit.inference.loading import load_model as load_task

    path = _stage2_checkpoint(tmp, SMALL)
    checkpoint = torch.load(path, weights_only=True)
    # an older checkpoint (no bundle: rebuilt from its hyperparameters) whose overrides were edited since
    del checkpoint["m3d_lit"]["bundle"]
    checkpoint["hyper_parameters"]["overrides"] = {"llm": {"num_hidden_layers": 1}}
    torch.save(checkpoint, path)
    problem = r"was made with another configuration of preset 'tiny' \(overrides differ\)"
    return lambda: load_task(path), path, problem


def corrupt_checkpoint(tmp: Path):
    from m3d_lit.inference.loading import load_model as load_task

    path = _stage2_checkpoint(tmp, SMALL)
    path.write_bytes(path.read_bytes()[:5000])
    problem = r"not a readable checkpoint: truncated, damaged or not from torch\.save \(OSError: \[Errno 22\] Invalid argument\)"
    return lambda: load_task(path), path, problem


def zero2_checkpoint_folder(tmp: Path):
    from m3d_lit.inference.loading import load_model as load_task

    # the layout DeepSpeed writes for `last.ckpt` under the zero2 preset (the files are never opened)
    folder = tmp / "checkpoints" / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint\n")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (folder / "checkpoint" / name).write_bytes(b"deepspeed")
    out = tmp / "checkpoints" / "last.fp32.ckpt"
    problem = re.escape(
        "is a DeepSpeed ZeRO checkpoint folder (tag 'checkpoint'), not one file: convert it with `python -c "
        '"from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict as '
        f"convert; convert('{folder}', '{out}')\"` (needs `pip install deepspeed`), then pass {out}"
    )
    return lambda: load_task(folder), folder, problem


def folder_given_as_checkpoint(tmp: Path):
    from m3d_lit.inference.loading import load_model as load_task

    (tmp / "runs").mkdir()
    problem = (
        r"is a folder, not a checkpoint file \(nor a run or stage folder with checkpoints/, a sharded "
        r"checkpoint folder with \.metadata and meta\.pt, a DeepSpeed checkpoint folder with a `latest` tag, "
        r"an m3d-lit export folder with m3d_lit\.json, or an M3D-LaMed or M3D-CLIP directory with a "
        r"config\.json\)"
    )
    return lambda: load_task(tmp / "runs"), tmp / "runs", problem


def _tokenizer_dir(folder: Path, eos: bool) -> Path:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from m3d_lit.models.presets import resolve
    from m3d_lit.models.tokenizer import _trained_bpe_json

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if eos else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_bpe_json()), **special)
    tokenizer.save_pretrained(folder)  # no <im_patch>, [SEG], box tokens, no pad
    config = {**resolve("tiny", SMALL)["llm"], "vocab_size": len(tokenizer)}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return folder


def tokenizer_without_special_tokens(tmp: Path):
    from m3d_lit.tasks import AlignTask

    folder = _tokenizer_dir(tmp / "llm", eos=False)
    build = lambda: AlignTask(preset="tiny", overrides=VISION_ONLY, llm_path=str(folder)).configure_model()  # noqa: E731
    return build, folder, r"the tokenizer has no EOS token \(set eos_token in tokenizer_config\.json\)"


def out_folder_of_another_dataset(tmp: Path):
    (tmp / "out").mkdir()
    settings = {"dataset": "cq500", "size": [4, 16, 16], "window": "brain", "dtype": "float16"}
    (tmp / "out" / "prepare.json").write_text(json.dumps(settings))
    (tmp / "out" / "manifest.csv").write_text("id,source,orig_shape,orig_spacing,out_shape,sha256\n")
    root = _physionet(tmp / "raw", 4, np.zeros((16, 16, 4), np.int16))
    run = lambda: prepare_volumes("physionet", root, tmp / "out", size=(4, 16, 16), progress=False)  # noqa: E731
    problem = (
        rf"{re.escape(str(tmp / 'out'))} was prepared with \{{'dataset': 'cq500', .*\}}, this run asks for "
        r"\{'dataset': 'physionet', .*\}; use another --out"
    )
    return run, tmp / "out" / "prepare.json", problem


CASES = {
    f.__name__: f
    for f in (
        truncated_nii_gz, nifti_wrong_header, dicom_without_preamble, series_missing_slice, mixed_slice_sizes,
        volume_of_nan, volume_of_inf, constant_volume, image_2d_where_3d_expected, single_slice_scan,
        reads_missing_column, reads_duplicate_scan, reads_value_not_0_1, physionet_slice_count_mismatch,
        m3d_vqa_empty_answer, qa_line_not_json, checkpoint_of_another_preset,
        checkpoint_of_another_configuration, corrupt_checkpoint, zero2_checkpoint_folder,
        folder_given_as_checkpoint, tokenizer_without_special_tokens, out_folder_of_another_dataset,
    )
}  # fmt: skip
NOT_YET: dict[str, str] = {}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_message_naming_the_file_and_the_problem(name: str, tmp_path: Path, request) -> None:
    if name in NOT_YET:
        # only "did not raise" is the expected failure: a check with another message must update this case
        request.applymarker(
            pytest.mark.xfail(reason=NOT_YET[name], strict=True, raises=pytest.fail.Exception)
        )
    run, path, problem = CASES[name](tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "out" in p.parts}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError) as err:
            run()
    assert err.value.path == str(path)
    assert re.fullmatch(problem, err.value.problem, flags=re.DOTALL), err.value.problem
    assert str(err.value) == f"{path}: {err.value.problem}"
    for file, data in before.items():  # outputs written before the error stay as they were
        assert file.read_bytes() == data, file


@pytest.mark.parametrize(
    "text", [lambda s: "\ufeff" + s, lambda s: s.replace("\n", "\r\n"), lambda s: s[:-1]]
)
def test_reads_csv_with_bom_crlf_or_no_final_newline_reads_like_a_plain_one(tmp_path: Path, text) -> None:
    rows = [CQ500_HEADER, _row("CQ500-CT-1", "1"), _row("CQ500-CT-2")]
    plain = read_cq500_reads(_reads(tmp_path / "plain.csv", rows))
    assert read_cq500_reads(_reads(tmp_path / "reads.csv", rows, text)) == plain


def test_scan_named_in_reads_csv_without_images_is_listed(tmp_path: Path) -> None:
    from m3d_lit.data.qa import write_qa

    raw = tmp_path / "raw"
    assert (
        synth.main(["--out", str(raw), "--cq500", "4", "--physionet", "0", "--shape", "8", "32", "32"]) == 0
    )
    scan = raw / "cq500" / "CQ500-CT-2"
    for f in scan.rglob("*.dcm"):
        f.unlink()
    result = prepare_volumes("cq500", raw / "cq500", tmp_path / "out", size=(8, 32, 32), progress=False)
    assert result.skipped == [("CQ500-CT-2", "CQ500-CT-2", "no series folder with DICOM files in this scan")]
    with pytest.warns(
        UserWarning, match=r"1 labelled id\(s\) in .*reads\.csv were not prepared .*\['CQ500-CT-2'\]"
    ):
        write_qa("cq500", raw / "cq500", tmp_path / "out", result.ids)


def test_llm_settings_beside_llm_path_are_refused_not_ignored(tmp_path: Path) -> None:
    from m3d_lit.models.build import build_lamed

    folder = _tokenizer_dir(tmp_path / "llm", eos=True)
    with pytest.raises(
        InputError, match=r'overrides\.llm: \{"num_hidden_layers": 1\} would be ignored: the LLM'
    ):
        build_lamed("tiny", SMALL, llm_path=folder)


def test_tokenizer_without_the_lamed_tokens_gets_them_added(tmp_path: Path) -> None:
    from m3d_lit.tasks import AlignTask
    from m3d_lit.tokens import LAMED_TOKENS

    folder = _tokenizer_dir(tmp_path / "llm", eos=True)
    task = AlignTask(preset="tiny", overrides=VISION_ONLY, llm_path=str(folder))
    task.configure_model()
    vocab = task.model.tokenizer.get_vocab()
    assert all(t in vocab for t in LAMED_TOKENS) and task.model.tokenizer.pad_token is not None
    assert task.model.llm.get_input_embeddings().num_embeddings == len(task.model.tokenizer)
