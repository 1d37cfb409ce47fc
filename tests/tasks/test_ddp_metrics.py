"""Validation metrics are exact epoch values: 2 DDP ranks (CPU, gloo) and other batch sizes give the value
one process computes over the whole split, not a mean of per-batch means.

The model's forward is replaced by one whose outputs are exact functions of each sample (integer-valued
features, predictions that copy or miss chosen tokens, masks shifted by a per-sample amount), so the samples'
own values do not depend on which batch or rank they land in; what is under test is the aggregation.
The ranks are forked from the test process (`ddp_fork`), as in test_ddp.py.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from conftest import CLIP, LAMED, built

# 5 patients x 3 questions: 2 ranks get 8 and 7 samples, batch sizes 4 and 3 leave partial batches, and
# the 3 [SEG] rows (lines 2, 8, 14) all go to rank 0, so rank 1 must sync metrics it never updated
VAL_PATIENTS = 5


def _salt(sample_id: str) -> int:
    return zlib.crc32(sample_id.encode())


def fake_lm_outputs(batch: dict, vocab: int) -> dict[str, torch.Tensor]:
    """Predictions that hit each answer token except those whose id + salt is divisible by 2 + salt % 3 (a
    rule of the token, not of its place, which padding moves); seg logits = the true mask rolled by
    salt % 3 voxels along W (Dice 1, or less)."""
    positions = batch["label_positions"]
    targets = batch["labels"].flatten()[positions + 1]
    salts = torch.tensor([_salt(i) for i in batch["ids"]])
    salt = salts[positions // batch["labels"].shape[1]]
    miss = (targets + salt) % (2 + salt % 3) == 0
    predicted = torch.where(miss, (targets + 1) % vocab, targets)
    rows, masks = batch["seg_rows"], batch["masks"]  # one mask per row of seg_rows
    shifted = [
        torch.roll(m.float(), int(_salt(batch["ids"][int(r)]) % 3), dims=-1) for m, r in zip(masks, rows)
    ]
    zero = torch.zeros(())
    seg = torch.stack(shifted) * 20.0 - 10.0 if shifted else None
    # a mask loss that is the mean of a per-row value, as the real one is
    dice_loss = (salts[rows] % 7).float().mean() / 7 if len(rows) else zero
    return {
        "lm_loss": zero,
        "predicted": predicted,
        "targets": targets,
        "dice": dice_loss,
        "bce": zero,
        "seg_logits": seg,
        "seg_rows": rows,
    }


def fake_clip_outputs(images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Integer-valued features: every dot product is exact in float64, whatever the order of the sum."""
    image = torch.round(images.flatten(1)[:, :8].float() * 4.0)
    text = image + (input_ids.sum(1, keepdim=True) % 3).float()
    return image, text, torch.tensor(1.0)


def run_validate(stage: str, root: Path, devices: int, batch_size: int, out: Path) -> dict[str, float]:
    """`trainer.validate` of a stage-1 or stage-3 task with the fake forward; each rank writes its metrics."""
    from datetime import timedelta

    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import DDPStrategy

    from m3d_lit.data.datamodules import BrainCTQADataModule
    from m3d_lit.tasks import ClipTask, FinetuneTask

    class Record(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            values = {k: float(v) for k, v in trainer.callback_metrics.items()}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(values))

    if stage == "clip":
        task = built(ClipTask(preset="tiny", overrides=CLIP, text_max_length=32))
        task.model.forward = fake_clip_outputs
    else:
        task = built(FinetuneTask(preset="tiny", overrides=LAMED, log_examples=0))
        vocab = task.model.llm.get_input_embeddings().num_embeddings
        task.forward_batch = lambda batch: fake_lm_outputs(batch, vocab)
    data = BrainCTQADataModule(
        [str(root)], mode="report" if stage == "clip" else "qa", batch_size=batch_size, augment=False
    )
    # a collective one rank skips fails after the timeout instead of hanging the test run
    ddp = DDPStrategy(start_method="fork", timeout=timedelta(seconds=120))
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=ddp if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    trainer.validate(task, datamodule=data)
    return json.loads((out / "rank0.json").read_text())


def expected_finetune(root: Path, vocab_of) -> dict[str, float]:
    """The exact epoch values, from the whole split at once in this process."""
    from m3d_lit.data.datasets import QAJsonlDataset
    from m3d_lit.tasks import FinetuneTask
    from m3d_lit.tasks.metrics import MeanDice, TokenAccuracy

    task = built(FinetuneTask(preset="tiny", overrides=LAMED, log_examples=0))
    dataset = QAJsonlDataset(root / "qa_val.jsonl")
    batch = task.configure_collate()([dataset[i] for i in range(len(dataset))])
    out = fake_lm_outputs(batch, vocab_of(task))
    accuracy, dice = TokenAccuracy(), MeanDice()
    accuracy.update(out["predicted"], out["targets"])
    dice.update(out["seg_logits"], batch["masks"])
    return {
        "val/token_acc": float(accuracy.compute()),
        "val/dice": float(dice.compute()),
        "val/loss_dice": float(out["dice"]),
    }


@pytest.mark.slow
def test_two_ranks_give_the_exact_single_process_metrics(tmp_path: Path) -> None:
    from conftest import write_prepared

    root = write_prepared(tmp_path / "physionet", "physionet", n_per_split=VAL_PATIENTS)
    vocab_of = lambda task: task.model.llm.get_input_embeddings().num_embeddings  # noqa: E731
    expected = expected_finetune(root, vocab_of)
    assert 0.3 < expected["val/token_acc"] < 0.9 and 0.3 < expected["val/dice"] < 1.0  # not trivial
    assert expected["val/loss_dice"] > 0
    for stage in ("finetune", "clip"):
        single = run_validate(stage, root, 1, 4, tmp_path / stage / "single")
        run_validate(stage, root, 2, 3, tmp_path / stage / "ddp")
        ranks = [json.loads((tmp_path / stage / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
        print(f"{stage}: 1 process (batch 4) {single}; 2 ranks (batch 3) {ranks}")
        keys = (
            ("val/token_acc", "val/dice", "val/loss_dice")
            if stage == "finetune"
            else ("val/i2t_R@1", "val/t2i_R@5")
        )
        for key in keys:
            # the logs hold float32; the float64 values differ at most in the order of float64 additions
            for values in (*ranks, single):
                assert values[key] == pytest.approx(single[key], abs=1e-7, rel=0)
            if key in expected:
                assert single[key] == pytest.approx(expected[key], abs=1e-7, rel=0)


def test_metrics_do_not_depend_on_the_batches() -> None:
    """One metric fed the samples in batches of any size gives the value of one batch of everything."""
    from m3d_lit.tasks.metrics import MeanDice, RetrievalRecall, TokenAccuracy

    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(7, 9, 11, generator=gen), torch.randint(0, 11, (7, 9), generator=gen)
    labels[torch.rand(7, 9, generator=gen) < 0.4] = -100
    seg, masks = torch.randn(7, 1, 4, 6, 6, generator=gen), (torch.rand(7, 1, 4, 6, 6, generator=gen) > 0.6)
    features = torch.randint(0, 4, (7, 5), generator=gen).double()  # integers: exact dot products
    text = features + torch.randint(0, 2, (7, 5), generator=gen)
    results = []
    for sizes in ([7], [3, 4], [1, 5, 1], [2, 2, 2, 1]):
        accuracy, dice, recall = TokenAccuracy(), MeanDice(), RetrievalRecall(ks=(1, 3))
        for part in torch.arange(7).split(sizes):
            shown = labels[part][:, 1:] != -100  # what the model returns: argmax and label where trained
            accuracy.update(logits[part][:, :-1].argmax(-1)[shown], labels[part][:, 1:][shown])
            dice.update(seg[part], masks[part])
            recall.update(features[part], text[part])
        results.append((float(accuracy.compute()), float(dice.compute()), recall.compute()))
    valid = labels[:, 1:] != -100
    exact = (logits[:, :-1].argmax(-1)[valid] == labels[:, 1:][valid]).double().mean()
    assert results[0][0] == float(exact)
    for accuracy, dice, recall in results[1:]:
        # counts are integers and recall compares exact sums; Dice sums differ in float64 addition order
        assert accuracy == results[0][0] and recall == results[0][2]
        assert dice == pytest.approx(results[0][1], abs=1e-12, rel=0)
