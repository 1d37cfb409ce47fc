"""Perceivers: ViT patch tokens -> a fixed number of visual tokens at the LLM width."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from m3d_lit.models.vision import as_triple

__all__ = [
    "BatchNormMLP",
    "SpatialPoolPerceiver",
    "SequencePoolPerceiver",
    "TokenBatchNorm",
    "projector",
    "set_batchnorm_sync",
]


class TokenBatchNorm(nn.Module):
    """Batch normalisation of each feature over all tokens of a batch (B x T x C in and out).

    The patch tokens of a ViT trained from scratch on look-alike volumes are one large vector shared by
    every scan plus differences a thousand times smaller (measured on the demo: image-token norm 56,
    across-scan std 0.0014), which the LLM cannot pick out. Standardising each feature brings the
    differences to unit scale; at inference it is a fixed affine map.

    In training, `stats_rows` (bool, B) picks the rows whose tokens make the batch statistics; every row
    is normalised with them. An empty volume (image dropout, `blank_prob`) lies 8-30 across-scan
    standard deviations from the scans, and one such row in a batch of 8 would inflate the variance
    ~10-fold and squash the real scans' differences in that batch and in the running statistics.

    With `sync` set under DDP (`BaseTask` sets it when the trainer has `sync_batchnorm=True`), the
    statistics are those of the chosen rows of all ranks: sums and counts are all-reduced through
    autograd, so the gradient is that of the global batch. It holds BatchNorm1d's parameters and buffers
    (same state-dict keys) but is not a torch `_BatchNorm`: `SyncBatchNorm.convert_sync_batchnorm` would
    replace it by a SyncBatchNorm that knows neither the B x T x C layout nor `stats_rows`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum, self.sync = eps, momentum, False
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, tokens: Tensor, stats_rows: Tensor | None = None) -> Tensor:
        # outside autocast, in the statistics' dtype: CPU autocast hands it bf16 activations
        with torch.autocast(tokens.device.type, enabled=False):
            x = tokens.to(self.running_mean.dtype)
            mean, var = self.running_mean, self.running_var
            if self.training:
                rows = x.new_ones(x.shape[0]) if stats_rows is None else stats_rows.to(x.device, x.dtype)
                mean, var = self._batch_statistics(x, rows)
            normed = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return normed.to(tokens.dtype)

    def _synchronised(self) -> bool:
        dist = torch.distributed
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _batch_statistics(self, x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over the tokens of the rows weighted 1 in `rows` (x: B x ... x C), on
        this rank or over all ranks when synchronised; the running statistics when fewer than 2 tokens
        make them (then left as they are). Rows are weighted rather than selected, and the "fewer than 2"
        case is a `torch.where`, so nothing waits for the device to learn how many rows there are."""
        weight = rows.reshape(-1, *([1] * (x.dim() - 1)))
        channels = x.shape[-1]
        total = (x * weight).reshape(-1, channels).sum(0)
        count = rows.sum() * (x[0].numel() // channels)
        if self._synchronised():
            from torch.distributed.nn.functional import all_reduce

            total = all_reduce(total)
            torch.distributed.all_reduce(count)
        enough = count >= 2  # the same on every rank when synchronised
        mean = total / count.clamp(min=1)
        # two passes, as torch's batch norm: E[x^2] - E[x]^2 loses the small variances of look-alike scans
        squares = ((x - mean) ** 2 * weight).reshape(-1, channels).sum(0)
        if self._synchronised():
            from torch.distributed.nn.functional import all_reduce

            squares = all_reduce(squares)
        var = squares / count.clamp(min=1)
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp(min=1)
            self.running_mean.copy_(
                torch.where(enough, self.running_mean.lerp(mean, self.momentum), self.running_mean)
            )
            self.running_var.copy_(
                torch.where(enough, self.running_var.lerp(unbiased, self.momentum), self.running_var)
            )
            self.num_batches_tracked.add_(enough.long())
        return torch.where(enough, mean, self.running_mean), torch.where(enough, var, self.running_var)


def set_batchnorm_sync(model: nn.Module, sync: bool) -> int:
    """Switch cross-rank statistics of every `TokenBatchNorm` in `model`; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, TokenBatchNorm)]
    for layer in layers:
        layer.sync = sync
    return len(layers)


class BatchNormMLP(nn.Sequential):
    """`TokenBatchNorm`, then the two-layer MLP; `stats_rows` goes to the batch norm."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(TokenBatchNorm(in_dim), *projector("mlp", in_dim, out_dim))

    def forward(self, tokens: Tensor, stats_rows: Tensor | None = None) -> Tensor:
        tokens = self[0](tokens, stats_rows)
        for layer in list(self)[1:]:
            tokens = layer(tokens)
        return tokens


def projector(kind: str, in_dim: int, out_dim: int, depth: int | None = None) -> nn.Module:
    """`linear` (one layer), `mlp` (two layers with GELU), or `bn_mlp` (`BatchNormMLP`).

    `depth` builds M3D's projector layout instead: `depth` linear layers in an `nn.Sequential` (with
    GELU between them for `mlp`), so M3D-LaMed's `mm_projector.projector.N` weights load by index.
    """
    if depth is not None:
        if kind not in ("linear", "mlp") or depth < 1:
            raise ValueError(f"proj {kind!r} with depth {depth}: M3D's layout is linear or mlp, depth >= 1")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += (
                [nn.GELU(), nn.Linear(out_dim, out_dim)] if kind == "mlp" else [nn.Linear(out_dim, out_dim)]
            )
        return nn.Sequential(*layers)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "bn_mlp":
        return BatchNormMLP(in_dim, out_dim)
    raise ValueError(f"proj {kind!r} must be 'linear', 'mlp' or 'bn_mlp'")


def _project(projector: nn.Module, tokens: Tensor, stats_rows: Tensor | None) -> Tensor:
    return projector(tokens, stats_rows) if isinstance(projector, BatchNormMLP) else projector(tokens)


class SpatialPoolPerceiver(nn.Module):
    """Patch tokens back onto their 3D grid, average-pooled, then projected to the LLM width.

    Args:
        grid: the ViT patch grid (D/pd, H/ph, W/pw).
        in_dim: ViT width.
        out_dim: LLM width.
        pool: pooling kernel (= stride) per axis, one int or three; must divide `grid`.
        proj: `linear`, `mlp` or `bn_mlp`.
        depth: M3D's projector layout with this many linear layers (`projector`); None: m3d-lit's.
    """

    def __init__(
        self,
        grid: Sequence[int],
        in_dim: int,
        out_dim: int,
        pool: int | Sequence[int] = 2,
        proj: str = "mlp",
        depth: int | None = None,
    ) -> None:
        super().__init__()
        self.grid = as_triple(grid, "grid")
        self.pool = as_triple(pool, "pool")
        if any(g % p for g, p in zip(self.grid, self.pool)):
            raise ValueError(f"patch grid {self.grid} is not divisible by the pool kernel {self.pool}")
        self.out_grid = tuple(g // p for g, p in zip(self.grid, self.pool))
        self.num_tokens = self.out_grid[0] * self.out_grid[1] * self.out_grid[2]
        self.in_dim = in_dim
        self.projector = projector(proj, in_dim, out_dim, depth)

    def forward(self, tokens: Tensor, stats_rows: Tensor | None = None) -> Tensor:
        """tokens B x N x in_dim (N = prod(grid)) -> B x num_tokens x out_dim; `stats_rows` (bool, B):
        the rows that make a `bn_mlp` projector's batch statistics in training (all when None)."""
        b, n, c = tokens.shape
        if n != self.grid[0] * self.grid[1] * self.grid[2] or c != self.in_dim:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match grid {self.grid} x {self.in_dim}")
        (d, h, w), (pd, ph, pw) = self.out_grid, self.pool
        # Mean over each pool block by reshaping (avg_pool3d has no bf16 kernel on CPU).
        grid = tokens.reshape(b, d, pd, h, ph, w, pw, c)
        return _project(self.projector, grid.mean(dim=(2, 4, 6)).reshape(b, self.num_tokens, c), stats_rows)


class SequencePoolPerceiver(nn.Module):
    """Average-pool consecutive patch tokens along the sequence, then project.

    Args:
        num_patches: patch tokens in.
        in_dim: ViT width.
        out_dim: LLM width.
        pool: tokens averaged into one; must divide `num_patches`.
        proj: `linear`, `mlp` or `bn_mlp`.
        depth: as in `SpatialPoolPerceiver`.
    """

    def __init__(
        self,
        num_patches: int,
        in_dim: int,
        out_dim: int,
        pool: int = 8,
        proj: str = "mlp",
        depth: int | None = None,
    ) -> None:
        super().__init__()
        if pool < 1 or num_patches % pool:
            raise ValueError(f"num_patches {num_patches} is not divisible by pool {pool}")
        self.num_patches = num_patches
        self.pool = pool
        self.num_tokens = num_patches // pool
        self.projector = projector(proj, in_dim, out_dim, depth)

    def forward(self, tokens: Tensor, stats_rows: Tensor | None = None) -> Tensor:
        """tokens B x num_patches x in_dim -> B x num_tokens x out_dim; `stats_rows` as in
        `SpatialPoolPerceiver`."""
        if tokens.shape[1] != self.num_patches:
            raise ValueError(f"got {tokens.shape[1]} patch tokens, expected {self.num_patches}")
        b, _, c = tokens.shape
        return _project(self.projector, tokens.reshape(b, self.num_tokens, self.pool, c).mean(2), stats_rows)
