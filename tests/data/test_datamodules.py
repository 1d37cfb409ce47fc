"""DataModules on tiny fixture files in the M3D-Data and ``prepare`` formats; every YAML in datamodules/."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import DATA_SHAPE, REPO, write_vqa_csv
from jsonargparse import ArgumentParser

from m3d_lit.cli import main
from m3d_lit.data.collate import LMCollator
from m3d_lit.data.datamodules import (
    BaseDataModule,
    BrainCTQADataModule,
    M3DCapDataModule,
    M3DSegDataModule,
    M3DVQADataModule,
    MixDataModule,
)
from m3d_lit.data.datasets import SampleKey
from m3d_lit.data.records import CAPTION_PROMPTS
from m3d_lit.data.sampling import EpochSampler, MixDataset, MixSampler
from m3d_lit.errors import InputError

YAML_DIR = REPO / "datamodules"
N = 4


def first_batch(dm: BaseDataModule, tokenizer, split: str = "train", stage: str = "fit") -> dict:
    dm.setup(stage)
    dm.collate_fn = LMCollator(tokenizer, N, max_length=48, img_size=DATA_SHAPE[1:])
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    batch = next(iter(loader))
    b = batch["images"].shape[0]
    segments = len(batch["seg_rows"])  # masks travel only for the rows that segment
    assert batch["images"].shape == (b, *DATA_SHAPE) and batch["masks"].shape == (segments, *DATA_SHAPE)
    assert batch["masks"].dtype == torch.bool and set(batch["seg_rows"].tolist()) <= set(range(b))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    return batch


def test_m3d_cap_pairs_prompts_with_report_text(m3d_cap_data, tiny_tokenizer):
    dm = M3DCapDataModule(
        root=str(m3d_cap_data["root"]), json_path=str(m3d_cap_data["json_path"]), batch_size=3
    )
    batch = first_batch(dm, tiny_tokenizer)
    assert all(q in CAPTION_PROMPTS for q in batch["questions"]) and set(batch["kinds"]) == {"caption"}
    val = first_batch(dm, tiny_tokenizer, "val")
    assert val["questions"] == [CAPTION_PROMPTS[0]] * 2
    assert val["answers"] == [
        "Findings: case validation 0 shows a bleed.",
        "Findings: case validation 1 shows a bleed.",
    ]


def test_m3d_vqa_closed_and_open_wording(m3d_vqa_data, tiny_tokenizer):
    paths = {k: str(v) for k, v in m3d_vqa_data.items()}
    closed = first_batch(M3DVQADataModule(**paths, mode="closed"), tiny_tokenizer, "val")
    assert closed["questions"][0] == "What organ is shown? Choices: A. brain B. liver C. lung D. heart"
    assert closed["answers"][0] == "B. liver" and closed["kinds"][0] == "closed"
    opened = first_batch(M3DVQADataModule(**paths, mode="open"), tiny_tokenizer, "val")
    assert opened["answers"][0] == "liver" and opened["questions"][0] == "What organ is shown?"


def test_m3d_vqa_empty_answer_names_file_and_row(m3d_vqa_data):
    rows = [
        [
            "vqa/train_0.npy",
            "t",
            "1",
            "Which plane?",
            "axial",
            "sagittal",
            "coronal",
            "oblique",
            "axial",
            "A",
        ],
        ["vqa/train_1.npy", "t", "1", "Which plane?", "axial", "sagittal", "coronal", "oblique", "", ""],
    ]
    path = write_vqa_csv(m3d_vqa_data["train_csv"], rows)
    dm = M3DVQADataModule(root=str(m3d_vqa_data["root"]), train_csv=str(path), mode="open")
    with pytest.raises(InputError, match=r"M3D_VQA_train\.csv: row at line 3 has empty \['Answer'\]"):
        dm.setup("fit")


def test_m3d_seg_positive_and_negative_samples(m3d_seg_data, tiny_tokenizer):
    dm = M3DSegDataModule(root=str(m3d_seg_data["root"]), datasets=m3d_seg_data["datasets"], batch_size=2)
    batch = first_batch(dm, tiny_tokenizer, "test", stage="test")
    assert batch["questions"] == [
        "Can you segment the liver in this image?",
        "Can you segment the kidney in this image?",
    ]
    assert batch["answers"] == ["It is [SEG].", "Sorry, there is no kidney."]
    assert batch["seg_flags"].tolist() == [True, False] and batch["seg_rows"].tolist() == [0]
    assert batch["masks"][0].sum() > 0 and len(batch["masks"]) == 1
    dm.setup("fit")
    assert dm.val_dataloader() == []  # val_split None: Lightning skips validation


def test_brainct_qa_and_report_modes(brainct_data, tiny_tokenizer):
    roots = [str(brainct_data["cq500"]), str(brainct_data["physionet"])]
    dm = BrainCTQADataModule(roots=roots, batch_size=16)
    batch = first_batch(dm, tiny_tokenizer, "val")
    assert Counter(batch["datasets"]) == {"cq500": 4, "physionet": 6}
    seg = [i for i, k in enumerate(batch["kinds"]) if k == "seg"]
    assert batch["seg_flags"].nonzero().flatten().tolist() == seg[:1]  # the second seg answer has no [SEG]
    assert batch["seg_rows"].tolist() == seg[:1]
    assert dm.flip_axes == ()
    reports = first_batch(
        BrainCTQADataModule(roots=roots, mode="report", batch_size=16), tiny_tokenizer, "test", "test"
    )
    assert set(reports["kinds"]) == {"caption"} and len(reports["ids"]) == 4
    assert set(reports["answers"]) == {"A bleed on the left."}


def test_image_dropout_reaches_the_train_dataset_only(brainct_data):
    dm = BrainCTQADataModule(roots=[str(brainct_data["physionet"])], blank_prob=0.25)
    dm.setup("fit")
    assert dm.datasets["train"].blank_prob == 0.25 and dm.datasets["val"].blank_prob == 0.0
    with pytest.raises(ValueError, match=r"blank_prob must be in \[0, 1\), got 1.0"):
        BrainCTQADataModule(roots=[str(brainct_data["physionet"])], blank_prob=1.0)


def test_dataloader_before_collate_fn_and_missing_files_are_clear_errors(brainct_data):
    dm = BrainCTQADataModule(roots=[str(brainct_data["cq500"])])
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="collate_fn is not set"):
        dm.train_dataloader()
    (brainct_data["cq500"] / "images" / "cq500-val-1.npy").unlink()
    with pytest.raises(InputError, match=r"qa_val\.jsonl: 2 files named here are missing"):
        BrainCTQADataModule(roots=[str(brainct_data["cq500"])]).setup("validate")
    (brainct_data["physionet"] / "qa_test.jsonl").unlink()
    both = BrainCTQADataModule(roots=[str(brainct_data["cq500"]), str(brainct_data["physionet"])])
    with pytest.raises(InputError, match=r"qa_test\.jsonl: is missing \(other roots have this split\)"):
        both.setup("test")


def test_m3d_cap_missing_text_and_image_in_one_error(m3d_cap_data):
    root = m3d_cap_data["root"]
    (root / "ct_case/train_001/text.txt").unlink()
    (root / "ct_case/train_002/image.npy").unlink()
    dm = M3DCapDataModule(root=str(root), json_path=str(m3d_cap_data["json_path"]))
    with pytest.raises(InputError, match=r"M3D_Cap\.json: 2 files named here are missing") as err:
        dm.setup("fit")
    assert "train_001/text.txt (missing)" in str(err.value) and "train_002/image.npy (missing)" in str(
        err.value
    )


def test_epoch_sampler_shards_disjointly_and_reshuffles_per_epoch():
    data = list(range(11))
    shards = [EpochSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    keys = [list(s) for s in shards]
    assert len(keys[0]) == len(keys[1]) == 6
    assert {k.index for k in keys[0] + keys[1]} == set(range(11)) and {k.epoch for k in keys[0]} == {0}
    again = list(EpochSampler(data, num_replicas=2, rank=0, seed=3))
    assert again == keys[0]
    shards[0].set_epoch(1)
    assert [k.index for k in shards[0]] != [k.index for k in keys[0]]


def test_mix_sampler_follows_weights_deterministically():
    mix = MixDataset({"a": list(range(5)), "b": list(range(50))})

    def make(rank: int) -> MixSampler:
        return MixSampler(mix, [3.0, 1.0], num_samples=2000, num_replicas=2, rank=rank, seed=1)

    first, second = list(make(0)), list(make(1))
    assert first == list(make(0)) and len(first) == len(second) == 1000
    share = sum(mix.locate(k.index)[0] == 0 for k in first + second) / 2000
    assert 0.7 < share < 0.8
    s = make(0)
    s.set_epoch(1)
    assert list(s) != first
    with pytest.raises(ValueError, match="positive weight"):
        MixSampler(mix, [1.0, 0.0], num_samples=10)


def test_mix_datamodule_draws_from_every_source(brainct_data, m3d_vqa_data, tiny_tokenizer):
    sources = {
        "cq500": BrainCTQADataModule(roots=[str(brainct_data["cq500"])]),
        "vqa": M3DVQADataModule(root=str(m3d_vqa_data["root"]), train_csv=str(m3d_vqa_data["train_csv"])),
    }
    dm = MixDataModule(sources, {"cq500": 1.0, "vqa": 1.0}, samples_per_epoch=40, batch_size=40)
    batch = first_batch(dm, tiny_tokenizer)
    assert set(batch["datasets"]) == {"cq500", "m3d_vqa"}
    assert first_batch(dm, tiny_tokenizer)["ids"] == batch["ids"]
    assert len(dm.datasets["val"]) == 4  # cq500 val only; the VQA source has no val split
    with pytest.raises(ValueError, match="must name exactly the sources"):
        MixDataModule(sources, {"cq500": 1.0})


class _Recorder(L.LightningModule):
    """Records what each training step sees; the loss is a dummy so the loop runs."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.seen = tokenizer, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def setup(self, stage: str) -> None:
        self.trainer.datamodule.collate_fn = LMCollator(self.tokenizer, N, 48, DATA_SHAPE[1:])

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["ids"]), round(float(batch["images"].sum()), 3)))
        return (self.weight * batch["images"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        raise AssertionError("M3D-Seg here has no val split: Lightning must not run validation")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: BaseDataModule, tokenizer) -> list:
    module = _Recorder(tokenizer)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return module.seen


def test_lightning_sets_the_epoch_so_runs_repeat_and_epochs_differ(m3d_seg_data, tiny_tokenizer):
    def make() -> M3DSegDataModule:
        return M3DSegDataModule(str(m3d_seg_data["root"]), m3d_seg_data["datasets"], batch_size=4, seed=5)

    seen = _fit(make(), tiny_tokenizer)
    assert [e for e, _, _ in seen] == [0, 1]
    assert seen[0][1:] != seen[1][1:]  # new order or new augmentation in epoch 1
    assert _fit(make(), tiny_tokenizer) == seen


def _point_at_fixtures(cfg: dict, fx: dict) -> dict:
    args, name = cfg["init_args"], cfg["class_path"].rsplit(".", 1)[1]
    if name == "MixDataModule":
        args["sources"] = {k: _point_at_fixtures(v, fx) for k, v in args["sources"].items()}
    elif name == "M3DCapDataModule":
        args.update(root=str(fx["cap"]["root"]), json_path=str(fx["cap"]["json_path"]))
    elif name == "M3DVQADataModule":
        args.update({k: str(v) for k, v in fx["vqa"].items() if k == "root" or args.get(k) is not None})
    elif name == "M3DSegDataModule":
        args.update(root=str(fx["seg"]["root"]), datasets=fx["seg"]["datasets"])
    elif name == "BrainCTQADataModule":
        args["roots"] = [
            str(fx["brainct"]["physionet" if "physionet" in r else "cq500"]) for r in args["roots"]
        ]
    elif name == "StreamingDataModule":
        args["input_dirs"] = [str(fx["chunks"] / Path(d).name) for d in args["input_dirs"]]
    return cfg


@pytest.mark.parametrize("path", sorted(YAML_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_datamodule_yaml_parses_and_loads_a_batch(
    path, tmp_path, m3d_cap_data, m3d_vqa_data, m3d_seg_data, brainct_data, tiny_tokenizer
):
    fixtures = {"cap": m3d_cap_data, "vqa": m3d_vqa_data, "seg": m3d_seg_data, "brainct": brainct_data}
    if path.name == "streaming.yaml":
        prepared = [str(brainct_data[n]) for n in ("cq500", "physionet")]
        assert main(["optimize", *prepared, "--out", str(tmp_path / "chunks")]) == 0
        fixtures["chunks"] = tmp_path / "chunks"
    overlay = tmp_path / path.name
    overlay.write_text(yaml.safe_dump(_point_at_fixtures(yaml.safe_load(path.read_text()), fixtures)))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(BaseDataModule, "data")
    cfg = parser.parse_args([f"--data={overlay}", "--data.init_args.num_workers=0"])
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, BaseDataModule) and dm.num_workers == 0
    first_batch(dm, tiny_tokenizer)


def test_worker_processes_load_the_same_augmented_batches(brainct_data, tiny_tokenizer):
    def batches(workers: int) -> list:
        dm = BrainCTQADataModule(roots=[str(brainct_data["physionet"])], flip_axes=(0,), num_workers=workers)
        dm.setup("fit")
        dm.collate_fn = LMCollator(tiny_tokenizer, N, 48, DATA_SHAPE[1:])
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        return [(b["ids"], b["images"]) for b in loader]

    alone, pooled = batches(0), batches(2)
    assert [ids for ids, _ in alone] == [ids for ids, _ in pooled]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(alone, pooled))
    assert isinstance(SampleKey(0, 3), tuple)
