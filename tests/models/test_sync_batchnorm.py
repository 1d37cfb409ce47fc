"""`trainer.sync_batchnorm=true` with the perceiver's `TokenBatchNorm`: statistics of the chosen rows of all
ranks, and the gradient of the global batch, as one process computes them on the whole batch (2 gloo ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from m3d_lit.models.perceiver import TokenBatchNorm

# 3 rows per rank of 4 tokens x 6 features; rank 1's last row is an empty volume left out of the statistics
ROWS = torch.tensor([True, True, True, True, True, False])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = 3.0 + torch.randn(6, 4, 6, generator=generator, dtype=torch.float64)
    tokens[5] = 0.0
    weights = torch.randn(6, 4, 6, generator=generator, dtype=torch.float64)  # makes a loss of every output
    return tokens, weights


def _layer() -> TokenBatchNorm:
    layer = TokenBatchNorm(6).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, 6))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    return layer


def _step(layer: TokenBatchNorm, part: slice) -> dict[str, list]:
    tokens, weights = _batch()
    x = tokens[part].clone().requires_grad_(True)
    out = layer(x, stats_rows=ROWS[part])
    (out * weights[part]).sum().backward()
    return {
        "out": out.tolist(), "x_grad": x.grad.tolist(), "w_grad": layer.weight.grad.tolist(),
        "b_grad": layer.bias.grad.tolist(), "running_mean": layer.running_mean.tolist(),
        "running_var": layer.running_var.tolist(),
    }  # fmt: skip


def _rank(rank: int, folder: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/group", rank=rank, world_size=2
    )
    try:
        layer = _layer()
        layer.sync = True
        result = _step(layer, slice(3 * rank, 3 * rank + 3))
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_with_sync_give_the_statistics_and_gradients_of_the_whole_batch(tmp_path: Path) -> None:
    context = torch.multiprocessing.get_context("fork")
    ranks = [context.Process(target=_rank, args=(r, str(tmp_path))) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [p.exitcode for p in ranks] == [0, 0]
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = {k: torch.tensor(v, dtype=torch.float64) for k, v in _step(_layer(), slice(0, 6)).items()}
    part = [{k: torch.tensor(v, dtype=torch.float64) for k, v in p.items()} for p in parts]
    # float64 throughout: the two runs differ only in the order of the sums (~1e-15 relative)
    close = {"rtol": 1e-10, "atol": 1e-10}
    for key in ("out", "x_grad"):  # each rank's rows, and their gradient through the shared statistics
        assert torch.allclose(torch.cat([part[0][key], part[1][key]]), whole[key], **close), key
    for key in ("w_grad", "b_grad"):  # DDP sums (then averages) the parameter gradients of the ranks
        assert torch.allclose(part[0][key] + part[1][key], whole[key], **close), key
    for key in ("running_mean", "running_var"):
        assert torch.allclose(part[0][key], whole[key], **close) and torch.equal(part[0][key], part[1][key])
    unsynced = _layer()
    local = _step(unsynced, slice(3, 6))  # what rank 1 would compute on its own rows
    assert not torch.allclose(torch.tensor(local["out"], dtype=torch.float64), whole["out"][3:], **close)


def test_trainer_sync_batchnorm_keeps_the_perceiver_norm_and_switches_its_sync_on() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from m3d_lit.models.perceiver import BatchNormMLP

    model = nn.Sequential(BatchNormMLP(6, 4), nn.BatchNorm1d(4))
    converted = TorchSyncBatchNorm().apply(model)
    # torch's own batch norm is converted; the perceiver's is kept, with its B x T x C layout and rows
    assert isinstance(converted[0][0], TokenBatchNorm) and isinstance(converted[1], nn.SyncBatchNorm)

    from m3d_lit.tasks.base import BaseTask

    class Task(BaseTask):
        def build_model(self) -> nn.Module:
            return nn.Sequential(BatchNormMLP(6, 4))

    for flag in (True, False):
        trainer = Trainer(accelerator="cpu", devices=1, strategy="ddp", sync_batchnorm=flag, logger=False)
        task = Task()
        task.trainer = trainer
        trainer.state.fn = "validate"
        task.configure_model()
        assert task.model[0][0].sync is flag


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return _batch()[0][index].float()


def _fit_tokens(devices: int, folder: Path) -> None:
    """One SGD step of a BaseTask around the perceiver's projector, `sync_batchnorm` on; rank 0 writes."""
    from lightning.pytorch import Callback, Trainer

    from m3d_lit.models.perceiver import BatchNormMLP
    from m3d_lit.tasks.base import BaseTask

    class Task(BaseTask):
        def build_model(self) -> nn.Module:
            return nn.Sequential(BatchNormMLP(6, 4))

        def model_step(self, batch: torch.Tensor, split: str) -> torch.Tensor:
            rows = batch.abs().sum((1, 2)) > 0  # as LamedModel.embed: empty volumes make no statistics
            return self.model[0](batch, rows).pow(2).mean()

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(_Tokens(), batch_size=6 // devices)

    class Record(Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            norm = pl_module.model[0][0]
            record = {"sync": norm.sync, "mean": norm.running_mean.tolist(), "var": norm.running_var.tolist()}
            (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    torch.manual_seed(0)
    task = Task(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), warmup_ratio=0.0)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", sync_batchnorm=True,
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], use_distributed_sampler=True,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    trainer.fit(task)


def test_trainer_with_sync_batchnorm_on_two_gloo_ranks_keeps_whole_batch_statistics(tmp_path: Path) -> None:
    _fit_tokens(2, tmp_path / "ddp")
    _fit_tokens(1, tmp_path / "single")
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert all(r["sync"] for r in ranks)
    # float32 sums of 20 tokens in another order: ~1e-6 relative; a rank's own statistics differ by ~10%
    for key in ("mean", "var"):
        for rank in ranks:
            assert torch.allclose(torch.tensor(rank[key]), torch.tensor(single[key]), rtol=1e-5, atol=1e-6), (
                key
            )
