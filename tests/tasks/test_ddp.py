"""Stage 1 under 2-process DDP (CPU, gloo) gives the loss one process gets on the same global batch.

`ClipTask` gathers the features of every rank with their gradients, so each rank's loss is the loss of the
whole global batch. The ranks are forked from the test process (`ddp_fork`), which saves each rank the
imports a fresh interpreter would spend most of its time on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GLOBAL_BATCH = 4
STEPS = 2
# dropout 0 everywhere so the two runs compute the same function
OVERRIDES = {
    "img_size": [8, 16, 16],
    "patch_size": [4, 8, 8],
    "vision": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dropout_rate": 0.0},
    "text": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    # the global-batch loss is rank-independent with a linear head (the paper's); a batch-norm head would
    # need SyncBatchNorm for that, since each rank normalises over its own part of the batch
    "clip": {"embed_dim": 16, "max_length": 32, "head": "linear"},
}


def make_reports(root: Path) -> list[Path]:
    """Two `prepare` folders with 2 training pairs each (4 = one global batch), every report distinct."""
    from conftest import write_prepared

    roots = []
    for name in ("cq500", "physionet"):
        out = write_prepared(root / name, name)
        lines = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
        for i, line in enumerate(lines):  # distinct texts, so a pairing mix-up changes the loss
            line["text"] = f"{name} report {i}: a bleed on the {'left' if i % 2 else 'right'}."
        (out / "reports.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        roots.append(out)
    return roots


def save_text_encoder(folder: Path) -> None:
    """A local BERT directory (weights + tokenizer), read through `text_path` as a real run reads one.

    Both runs then tokenise with the very same vocabulary, whatever the built-in tokenizer does.
    """
    from m3d_lit.models.clip import build_clip

    torch.manual_seed(0)
    clip = build_clip("tiny", OVERRIDES)
    clip.text.save_pretrained(str(folder))
    clip.text_tokenizer.save_pretrained(str(folder))


def run_stage1(roots: list[Path], text_path: Path, devices: int, out: Path) -> list[float]:
    """Train stage 1 for `STEPS` steps on `devices` CPU processes; each rank writes its step losses."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from m3d_lit.data.datamodules import BrainCTQADataModule
    from m3d_lit.tasks import ClipTask

    class Losses(Callback):
        # written by each rank itself: under `ddp_fork` the ranks are children of this process
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module) -> None:
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.values))

    seed_everything(0)
    # SGD passes a gradient mismatch of step 1 on to the step-2 loss; AdamW's normalisation would damp it
    task = ClipTask(
        preset="tiny",
        overrides=OVERRIDES,
        text_path=str(text_path),
        text_max_length=32,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        warmup_ratio=0.0,
    )
    data = BrainCTQADataModule(
        [str(r) for r in roots], mode="report", batch_size=GLOBAL_BATCH // devices, augment=False, seed=0
    )
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", precision="64-true",
        max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Losses()],
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    trainer.fit(task, datamodule=data)
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.slow
def test_two_process_ddp_loss_equals_one_process(tmp_path: Path) -> None:
    roots = make_reports(tmp_path / "data")
    save_text_encoder(tmp_path / "bert")
    run_stage1(roots, tmp_path / "bert", devices=2, out=tmp_path / "ddp")
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = run_stage1(roots, tmp_path / "bert", devices=1, out=tmp_path / "single")
    print(f"stage-1 loss per step: 1 process {single}, DDP rank 0 {ranks[0]}, rank 1 {ranks[1]}")
    assert len(single) == STEPS and all(len(r) == STEPS for r in ranks)
    # the weights moved, so equal step-2 losses also mean the step-1 gradients were equal
    assert single[1] != pytest.approx(single[0], abs=1e-4)
    # float64 (unit roundoff 1.1e-16): the two runs sum the same gradients in another order, which moves
    # losses near 1 by ~1e-15 after two steps; a wrong gather or pairing moves them by more than 1e-4
    for values in ranks:
        assert values == pytest.approx(single, abs=1e-10, rel=0)
