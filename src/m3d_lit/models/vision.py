"""3D ViT image encoder: MONAI's ViT layout in plain PyTorch, with scaled-dot-product attention.

MONAI's `ViT` neither exposes SDPA attention nor works without `einops` (its perceptron patch embedding
and attention use einops layers), so the same layers are written here with MONAI's parameter names and
tensor layouts (`patch_embedding.patch_embeddings.1`, `patch_embedding.position_embeddings`,
`blocks.N.attn.qkv`, `blocks.N.mlp.linear1`, `norm`, `cls_token`): M3D-CLIP and SegVol encoder weights
load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ViT3D", "PatchEmbedding", "TransformerBlock", "as_triple", "grid_size"]


def as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """An int or a 3-sequence as a 3-tuple of positive ints; `name` is used in the error."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(triple) != 3 or min(triple) < 1:
        raise ValueError(f"{name} {value!r} must be a positive int or three positive ints")
    return triple  # type: ignore[return-value]


def grid_size(img_size: Sequence[int] | int, patch_size: Sequence[int] | int) -> tuple[int, int, int]:
    """Patch grid (D/pd, H/ph, W/pw); raises if a side is not divisible by its patch side."""
    img, patch = as_triple(img_size, "img_size"), as_triple(patch_size, "patch_size")
    if any(i % p for i, p in zip(img, patch)):
        raise ValueError(f"img_size {img} is not divisible by patch_size {patch}")
    return tuple(i // p for i, p in zip(img, patch))  # type: ignore[return-value]


class _Patchify(nn.Module):
    """B x C x D x H x W -> B x N x (pd ph pw C), patches in (d, h, w) raster order like MONAI's."""

    def __init__(self, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        b, c, d, h, w = x.shape
        pd, ph, pw = self.patch_size
        x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, pd * ph * pw * c)


class PatchEmbedding(nn.Module):
    """Linear ("perceptron") patch embedding plus a learned position embedding."""

    def __init__(
        self, in_channels: int, img_size: tuple, patch_size: tuple, hidden_size: int, dropout: float
    ) -> None:
        super().__init__()
        grid = grid_size(img_size, patch_size)
        patch_dim = in_channels * patch_size[0] * patch_size[1] * patch_size[2]
        self.patch_embeddings = nn.Sequential(_Patchify(patch_size), nn.Linear(patch_dim, hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid[0] * grid[1] * grid[2], hidden_size))
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.patch_embeddings[1].weight, std=0.02, a=-2.0, b=2.0)
        nn.init.zeros_(self.patch_embeddings[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.patch_embeddings(x) + self.position_embeddings)


class _SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_output = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # MONAI's fused layout: (qkv, heads, head_dim) along the output features.
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(b, n, -1)))


class _MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.linear2(self.drop(F.gelu(self.linear1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout: float, qkv_bias: bool
    ) -> None:
        super().__init__()
        self.mlp = _MLP(hidden_size, mlp_dim, dropout)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = _SelfAttention(hidden_size, num_heads, dropout, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """Volume -> patch tokens (and a CLS feature), MONAI ViT layout with SDPA attention.

    Args:
        img_size: input volume size (D, H, W) or one int for all sides.
        patch_size: patch size (pd, ph, pw) or one int; must divide `img_size`.
        in_channels: image channels (1 for CT).
        hidden_size: token width.
        mlp_dim: width of each block's feed-forward layer.
        num_layers: transformer blocks.
        num_heads: attention heads; must divide `hidden_size`.
        dropout_rate: dropout inside the blocks.
        cls_token: prepend a learned CLS token (M3D-CLIP has one, SegVol's encoder does not).
        qkv_bias: bias on the fused qkv projection (the paper's encoder has none).
    """

    def __init__(
        self,
        img_size: Sequence[int] | int = (32, 256, 256),
        patch_size: Sequence[int] | int = (4, 16, 16),
        in_channels: int = 1,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        dropout_rate: float = 0.0,
        cls_token: bool = True,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.img_size = as_triple(img_size, "img_size")
        self.patch_size = as_triple(patch_size, "patch_size")
        self.grid = grid_size(self.img_size, self.patch_size)
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.patch_embedding = PatchEmbedding(
            in_channels, self.img_size, self.patch_size, hidden_size, dropout_rate
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if cls_token else None
        self.gradient_checkpointing = False

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """images B x C x D x H x W -> (patch tokens B x N x hidden, CLS feature B x hidden or None)."""
        expected = (self.in_channels, *self.img_size)
        if images.dim() != 5 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)} do not match B x {expected}")
        x = self.patch_embedding(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: reentrant checkpointing breaks DDP and frozen-input graphs.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if self.cls_token is None:
            return x, None
        return x[:, 1:], x[:, 0]
