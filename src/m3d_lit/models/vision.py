"""3D ViT image encoder: MONAI's ViT layout in plain PyTorch, with scaled-dot-product attention.

MONAI's `ViT` neither exposes SDPA attention nor works without `einops` (its perceptron patch embedding
and attention use einops layers), so the same layers are written here with MONAI's parameter names and
tensor layouts (`patch_embedding.patch_embeddings.1`, `patch_embedding.position_embeddings`,
`blocks.N.attn.qkv`, `blocks.N.mlp.linear1`, `norm`, `cls_token`): M3D-CLIP and SegVol encoder weights
load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ViT3D", "PatchEmbedding", "TransformerBlock", "as_triple", "grid_size", "norm_linear"]


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
        return self.attend(self.qkv(x))

    def attend(self, qkv: Tensor) -> Tensor:
        """Attention from the fused projection's output (B x N x 3 hidden)."""
        b, n, _ = qkv.shape
        # MONAI's fused layout: (qkv, heads, head_dim) along the output features.
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(b, n, -1)))


class _GeluLinear(torch.autograd.Function):
    """`linear(gelu(h))` that keeps only `h` for backward and recomputes the GELU there.

    Autograd would keep both `h` (for GELU's gradient) and `gelu(h)` (for the weight's gradient): two
    mlp_dim-wide activations per token. The GELU is cheap to redo, so backward recomputes it from `h`;
    the matrix products are those of `F.linear`'s backward, in the dtype the forward's ran in (autocast's
    or the weights'). A ViT-B block keeps 12.6 of its ~57 MB per 2048-token volume less.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, weight = ctx.saved_tensors
        wants_h, wants_weight, wants_bias = ctx.needs_input_grad
        flat = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_weight = grad_bias = None
        if wants_h:
            grad_h = torch.ops.aten.gelu_backward(grad @ weight.to(grad.dtype), h).to(h.dtype)
        if wants_weight:
            act = F.gelu(h).to(grad.dtype)
            grad_weight = (flat.t() @ act.reshape(-1, act.shape[-1])).to(weight.dtype)
        if wants_bias:
            grad_bias = flat.sum(0).to(ctx.bias_dtype)
        return grad_h, grad_weight, grad_bias


class _NormLinear(torch.autograd.Function):
    """`linear(layer_norm(x))` that keeps `x` and the norm's statistics, not the normalised copy.

    Under autocast the norm runs in float32 and its output is cast for the matrix product, which keeps
    that cast (one hidden-wide copy per token) for the weight's gradient; `x` itself is kept anyway for
    the norm's own gradient. Backward redoes the cheap normalisation from `x`, mean and rstd instead.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, norm: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor | None, eps: float
    ) -> Tensor:
        ctx.dtypes = (x.dtype, norm.dtype, None if bias is None else bias.dtype)
        if _autocast(x):  # autocast runs layer norms in float32
            x, norm, norm_bias = x.float(), norm.float(), norm_bias.float()
        normed, mean, rstd = torch.native_layer_norm(x, norm.shape, norm, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm, norm_bias, weight)
        return F.linear(normed, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, norm, norm_bias, weight = ctx.saved_tensors
        x_dtype, norm_dtype, bias_dtype = ctx.dtypes
        wants = ctx.needs_input_grad
        flat = grad.reshape(-1, grad.shape[-1])
        grads: list[Tensor | None] = [None] * 6
        if wants[3]:
            normed = ((x - mean) * rstd * norm + norm_bias).to(grad.dtype)
            grads[3] = (flat.t() @ normed.reshape(-1, normed.shape[-1])).to(weight.dtype)
        if wants[4]:
            grads[4] = flat.sum(0).to(bias_dtype)
        if any(wants[:3]):
            grad_normed = (grad @ weight.to(grad.dtype)).to(x.dtype)
            grad_x, grad_norm, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x, norm.shape, mean, rstd, norm, norm_bias, list(wants[:3])
            )
            grads[:3] = [
                None if g is None else g.to(dtype)
                for g, dtype in ((grad_x, x_dtype), (grad_norm, norm_dtype), (grad_norm_bias, norm_dtype))
            ]
        return tuple(grads)


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for `x`'s device (a device without autocast, e.g. meta, has it off)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def norm_linear(norm: nn.LayerNorm, linear: nn.Linear, x: Tensor) -> Tensor:
    """`linear(norm(x))`, with the normalised copy recomputed in backward when gradients are taken."""
    if _recomputes(x, norm.weight, linear.weight) and norm.elementwise_affine and norm.bias is not None:
        return _NormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps)
    return linear(norm(x))


def _recomputes(*tensors: Tensor) -> bool:
    """Whether a block takes its memory-saving path: a gradient is wanted and nothing compiles it (a
    compiled block's partitioner chooses what to recompute by itself)."""
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return wanted and not torch.compiler.is_compiling()


class _MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.linear1(x))

    def tail(self, h: Tensor) -> Tensor:
        """The rest of the MLP after its first linear layer."""
        if self.drop.p == 0 and _recomputes(h, self.linear2.weight):
            return _GeluLinear.apply(h, self.linear2.weight, self.linear2.bias)
        return self.drop(self.linear2(self.drop(F.gelu(h))))


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
        # each norm is fused with the projection after it, so backward recomputes the normalised copy
        x = x + self.attn.attend(norm_linear(self.norm1, self.attn.qkv, x))
        return x + self.mlp.tail(norm_linear(self.norm2, self.mlp.linear1, x))


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
