"""`m3d-lit embed`: normalised image and text embeddings, and their similarity logits, for retrieval.

    m3d-lit embed --checkpoint CKPT_OR_M3D_CLIP_DIR --volume A.npy B.nii.gz ... --text "..." ...
                  --out emb.json [--device cpu|cuda]

CKPT is a stage-1 (CLIP) checkpoint of m3d-lit or an official M3D-CLIP directory. Each volume (DICOM
folder, `.nii`/`.nii.gz`, `.npy`) goes through the same preprocessing as `ask`; an `.npy` already at the
model's size goes in unchanged. `emb.json` holds `{"image": [[...]], "text": [[...]], "logits": [[...]]}`:
one L2-normalised row per volume and per text, and `logits[i][j]` = scale x image i . text j with the
model's own scale (see docs/architecture.md, "CLIP logit scale"). Either side may be left out; `logits`
is then empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3d_lit.atomic import write_text
from m3d_lit.commands.arguments import CommandParser
from m3d_lit.data.preprocess import load_and_preprocess
from m3d_lit.errors import InputError
from m3d_lit.inference.loading import Loaded, load_model
from m3d_lit.inference.predictor import inference_dtype

__all__ = ["embed", "main"]


@torch.no_grad()
def _images(model: Any, volumes: list[Path], window: str) -> torch.Tensor:
    param = next(model.parameters())
    rows = []
    for volume in volumes:
        image = load_and_preprocess(volume, size=tuple(model.img_size), window=window).image
        batch = torch.from_numpy(np.asarray(image, dtype=np.float32))[None]
        rows.append(model.encode_image(batch.to(param.device, param.dtype)).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 0)


@torch.no_grad()
def _texts(model: Any, texts: list[str], max_length: int) -> torch.Tensor:
    if not texts:
        return torch.zeros(0, 0)
    device = next(model.parameters()).device
    tokens = model.text_tokenizer(
        texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    out = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    return out.float().cpu()


def embed(clip: Loaded, volumes: list[Path], texts: list[str]) -> dict[str, list]:
    """`{"image", "text", "logits"}` as nested lists (rows: volumes, columns of `logits`: texts)."""
    model, bundle = clip.model, clip.bundle
    max_length = bundle.text_max_length or model.max_length
    image, text = _images(model, volumes, bundle.scan_window()), _texts(model, texts, max_length)
    logits = []
    if len(image) and len(text):
        logits = (model.scale().detach().float().cpu() * image @ text.T).tolist()
    return {"image": image.tolist(), "text": text.tolist(), "logits": logits}


def _write(path: Path, result: dict[str, list]) -> None:
    write_text(path, json.dumps(result, allow_nan=False) + "\n")


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit embed`."""
    parser = CommandParser(prog="m3d-lit embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="stage-1 checkpoint or M3D-CLIP dir")
    parser.add_argument(
        "--volume",
        nargs="+",
        type=Path,
        default=[],
        help="DICOM folders, .nii/.nii.gz, .npy to embed (default: no image; give --volume, --text or both)",
    )
    parser.add_argument("--text", nargs="+", default=[], help="texts to embed (default: no text)")
    parser.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: cuda when there is one, else cpu)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.volume and not args.text:
        raise InputError("--volume/--text", "give at least one volume or one text")
    for volume in args.volume:
        if not volume.exists():
            raise InputError(volume, "does not exist")
    empty = [i for i, t in enumerate(args.text) if not t.strip()]
    if empty:
        raise InputError("--text", f"text {empty[0] + 1} is empty")
    clip = load_model(args.checkpoint, kind="clip", device=args.device)
    clip.model.to(inference_dtype(args.device))
    result = embed(clip, args.volume, args.text)
    _write(args.out, result)
    print(f"m3d-lit embed: {len(result['image'])} images, {len(result['text'])} texts -> {args.out}")
    return 0
