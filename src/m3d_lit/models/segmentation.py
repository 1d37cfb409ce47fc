"""Promptable 3D segmentation in SegVol's design, prompted by the projected `[SEG]` embedding.

image encoder (MONAI-block 3D ViT, no CLS) -> prompt encoder (the prompt is a text-like sparse token,
plus a learned "no mask" dense embedding and random-Fourier positions) -> SAM-style two-way transformer
mask decoder -> 2x2 transposed-conv upscaling -> trilinear upsampling to the volume size.

Module and parameter names follow SegVol's (`image_encoder`, `prompt_encoder.pe_layer`,
`mask_decoder.transformer.layers.N.cross_attn_token_to_image.q_proj`, ...), so `load_segvol_weights`
only strips prefixes and drops the parts this module does not have (point/box prompts, IoU head,
multi-mask outputs, SegVol's CLIP text encoder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3d_lit.errors import InputError
from m3d_lit.models.vision import ViT3D

__all__ = ["SegmentationModule", "load_segvol_weights", "segvol_key"]


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample`."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ValueError(
                f"attention width {inner} (= {dim} / {downsample}) is not divisible by heads {heads}"
            )
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        def split(x: Tensor) -> Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Tokens self-attend, attend to the image, pass an MLP; then the image attends to the tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample=2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))
        self.skip_first_pe = skip_first_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.skip_first_pe:  # the first layer's queries are the prompt tokens themselves
            queries = self.norm1(self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q, q, queries))
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class HyperMLP(nn.Module):
    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_feats))

    def forward(self, grid: Sequence[int]) -> Tensor:
        """Fourier features of the voxel centres of `grid`, C x D x H x W."""
        matrix = self.positional_encoding_gaussian_matrix
        axes = [(torch.arange(n, device=matrix.device, dtype=torch.float32) + 0.5) / n for n in grid]
        d, h, w = torch.meshgrid(*axes, indexing="ij")
        # SegVol stacks the axes as (second, first, third); kept so its trained matrix means the same.
        coords = 2 * torch.stack([h, d, w], dim=-1) - 1
        proj = 2 * math.pi * coords @ matrix.float()
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(3, 0, 1, 2)


class PromptEncoder(nn.Module):
    def __init__(self, dim: int, grid: Sequence[int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)

    def forward(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """prompts B x C -> sparse tokens B x 1 x C, dense embedding B x C x grid."""
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(prompts.shape[0], -1, *self.grid)
        return prompts.unsqueeze(1), dense


class MaskDecoder(nn.Module):
    """SAM's mask decoder; `full` keeps SegVol's IoU token and all its mask tokens.

    The trimmed decoder (`full=False`) runs one mask token beside the prompt. SegVol's own decoder runs
    the IoU token and `num_multimask_outputs + 1` mask tokens through the two-way transformer and reads
    the first mask token's output; since every token attends to the others, only `full=True` computes
    what SegVol (and M3D-LaMed) compute with their weights. Its IoU head and extra hypernetworks feed
    outputs nobody reads (multi-mask choice); they are kept so those weights load and export unchanged.
    """

    def __init__(
        self,
        dim: int,
        grid: Sequence[int],
        depth: int,
        heads: int,
        mlp_dim: int,
        full: bool = False,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        if dim % 8:
            raise ValueError(f"segmentation hidden_size {dim} must be divisible by 8 (upscaling widths)")
        self.transformer = TwoWayTransformer(dim, depth, heads, mlp_dim)
        num_masks = num_multimask_outputs + 1 if full else 1
        self.iou_token = nn.Embedding(1, dim) if full else None
        self.mask_tokens = nn.Embedding(num_masks, dim)
        up_grid = tuple(2 * g for g in grid)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            nn.LayerNorm((dim // 4, *up_grid)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            HyperMLP([dim, dim, dim, dim // 8]) for _ in range(num_masks)
        )
        if full:
            hidden = [iou_head_hidden_dim] * (iou_head_depth - 1)
            self.iou_prediction_head = HyperMLP([dim, *hidden, num_masks])
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def unread_parameters(self) -> list[nn.Parameter]:
        """The IoU head's and the extra hypernetworks' weights, which no output reads (DDP needs them frozen)."""
        unread = list(self.output_hypernetworks_mlps[1:].parameters())
        if self.iou_token is not None:
            unread += list(self.iou_prediction_head.parameters())
        return unread

    def forward(
        self, image: Tensor, image_pe: Tensor, prompts: Tensor, sparse: Tensor, dense: Tensor
    ) -> Tensor:
        """Low-resolution mask logits B x 1 x (4 x grid)."""
        b = prompts.shape[0]
        fixed = self.mask_tokens.weight
        if self.iou_token is not None:
            fixed = torch.cat([self.iou_token.weight, fixed], dim=0)
        tokens = torch.cat([fixed.expand(b, -1, -1).to(sparse.dtype), sparse], dim=1)
        hs, keys = self.transformer(image + dense, image_pe.expand(b, -1, -1, -1, -1), tokens)
        up = self.output_upscaling(keys.transpose(1, 2).reshape(image.shape))
        first_mask = 0 if self.iou_token is None else 1
        # Mask = hypernetwork(mask token) . features, plus SegVol's direct prompt-feature similarity.
        weights = self.output_hypernetworks_mlps[0](hs[:, first_mask])
        weights = weights + self.txt_align_upscaled_embedding(prompts)
        return torch.einsum("bc,bcdhw->bdhw", weights, up).unsqueeze(1)


class SegmentationModule(nn.Module):
    """SegVol-style promptable segmentation: (volume, prompt vector) -> mask logits at volume size.

    Args:
        img_size: volume size (D, H, W).
        patch_size: encoder patch size; must divide `img_size`.
        hidden_size: encoder and decoder width; the prompt vector has this width too.
        mlp_dim: encoder feed-forward width.
        num_layers: encoder blocks.
        num_heads: encoder heads.
        decoder_depth: two-way transformer layers.
        decoder_heads: decoder heads; must divide hidden_size / 2.
        decoder_mlp_dim: decoder feed-forward width.
        full_decoder: keep SegVol's IoU token and all mask tokens (`MaskDecoder`); what SegVol and
            M3D-LaMed compute. Off in m3d-lit's presets (the trimmed decoder trains from scratch).
        num_multimask_outputs: SegVol's extra mask tokens (with `full_decoder`).
        iou_head_depth: layers of the IoU head (with `full_decoder`).
        iou_head_hidden_dim: width of the IoU head (with `full_decoder`).
    """

    def __init__(
        self,
        img_size: Sequence[int] | int = (32, 256, 256),
        patch_size: Sequence[int] | int = (4, 16, 16),
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        full_decoder: bool = False,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.image_encoder = ViT3D(
            img_size, patch_size, 1, hidden_size, mlp_dim, num_layers, num_heads, cls_token=False
        )
        self.img_size, self.grid = self.image_encoder.img_size, self.image_encoder.grid
        self.prompt_dim = hidden_size
        self.prompt_encoder = PromptEncoder(hidden_size, self.grid)
        self.mask_decoder = MaskDecoder(
            hidden_size,
            self.grid,
            decoder_depth,
            decoder_heads,
            decoder_mlp_dim,
            full_decoder,
            num_multimask_outputs,
            iou_head_depth,
            iou_head_hidden_dim,
        )

    def forward(self, images: Tensor, prompts: Tensor) -> Tensor:
        """images B x 1 x D x H x W, prompts B x hidden_size -> mask logits B x 1 x D x H x W."""
        if prompts.dim() != 2 or prompts.shape != (images.shape[0], self.prompt_dim):
            raise ValueError(f"prompts {tuple(prompts.shape)} must be ({images.shape[0]}, {self.prompt_dim})")
        tokens, _ = self.image_encoder(images)
        image = tokens.transpose(1, 2).reshape(images.shape[0], -1, *self.grid)
        sparse, dense = self.prompt_encoder(prompts)
        image_pe = self.prompt_encoder.pe_layer(self.grid).unsqueeze(0).to(image.dtype)
        low = self.mask_decoder(image, image_pe, prompts, sparse, dense.to(image.dtype))
        return F.interpolate(low, size=self.img_size, mode="trilinear", align_corners=False)


_PREFIXES = ("module.", "model.", "seg_module.")
_DROPPED = (
    "text_encoder.",
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.mask_downscaling.",
)
_MULTIMASK = ("mask_decoder.iou_token.", "mask_decoder.iou_prediction_head.")


def segvol_key(key: str, full: bool = False) -> str | None:
    """SegVol (or M3D-LaMed `seg_module`) state-dict key -> this module's key; None for parts it lacks.

    Strips `module.` / `model.` / `seg_module.` prefixes; drops the CLIP text encoder, point/box/mask
    prompt layers and stale MONAI `cross_attn` keys, and for the trimmed decoder (`full=False`) the IoU
    token and head and hypernetworks 1..3 (multi-mask outputs); there `mask_decoder.mask_tokens.weight`
    keeps its first row (the single-mask output).
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    if key.startswith(_DROPPED) or ".cross_attn." in key:
        return None
    if full:
        return key
    if key.startswith(_MULTIMASK):
        return None
    hyper = "mask_decoder.output_hypernetworks_mlps."
    if key.startswith(hyper) and not key.startswith(hyper + "0."):
        return None
    return key


def load_segvol_weights(module: SegmentationModule, path: str | Path) -> dict[str, list[str]]:
    """Load SegVol's published weights (a local `.pth`/`.pt`) into `module` through `segvol_key`.

    Reads SegVol's release (`{"model": {"module.model.*": ...}}`) and the flat `model.*` dict M3D's
    `pretrain_seg_module` loads. A `full_decoder` module takes every decoder weight and computes what
    SegVol computes; the trimmed one takes the single-mask part (and computes something else). Every weight of `module` must be found with its shape; returns `{"loaded": [...], "skipped": [...]}`
    (source keys mapped away or unknown to this module).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "SegVol checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise InputError(path, f"not a readable checkpoint ({type(err).__name__})") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    own = module.state_dict()
    full = module.mask_decoder.iou_token is not None
    mapped: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        target = segvol_key(key, full)
        if target == "mask_decoder.mask_tokens.weight" and not full:
            value = value[:1]
        if target is None or target not in own:
            skipped.append(key)
            continue
        if tuple(value.shape) != tuple(own[target].shape):
            raise InputError(
                path, f"{key} has shape {tuple(value.shape)}, the module expects {tuple(own[target].shape)}"
            )
        mapped[target] = value
    missing = [key for key in own if key not in mapped]
    if missing:
        raise InputError(path, f"lacks {len(missing)} SegVol weights (first: {missing[:3]})")
    module.load_state_dict(mapped, strict=True)
    return {"loaded": sorted(mapped), "skipped": skipped}
