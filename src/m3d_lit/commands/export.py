"""`m3d-lit export`: a stage-3 checkpoint as files other tools load without m3d-lit's training code.

```
DIR/adapter/                 the LoRA adapter in peft's format (`PeftModel.from_pretrained`) + tokenizer
DIR/new_tokens.safetensors   the trained rows of the added tokens: `token_ids`, `input_rows`, `output_rows`
DIR/vision.safetensors       3D ViT (`ViT3D` names)
DIR/perceiver.safetensors    the perceiver
DIR/segmentation.safetensors the segmentation module (`segmentation.*`) and the [SEG] MLP (`seg_head.*`)
DIR/m3d_lit.json             the model's bundle (config, tokenizer, preprocessing per source, LoRA, version),
                             token ids, and whether DIR/llm/ holds the merged LLM
DIR/llm/                     with --merge: LoRA merged into the base weights and the new rows written into
                             the embedding and output matrices; a plain Hugging Face model + tokenizer
```
`--format m3d` writes instead a directory in M3D-LaMed's own layout and key names (config.json,
model.safetensors, tokenizer) that the official code loads, for a model built from an official
M3D-LaMed directory (that directory, or a stage-3 checkpoint fine-tuned from it): LoRA merged, the added
rows written in (`models/official/write.py`).

The adapter alone does not carry the added tokens' embeddings (a base LLM lacks those rows): use it with
`new_tokens.safetensors` and the tokenizer beside it, or export with `--merge`. Everything is written
into `DIR.tmp` and renamed to `DIR` at the end, so a failed export leaves no half-written `DIR`.
An export folder loads back wherever a checkpoint is taken (`ask --checkpoint DIR`, `eval`, the app):
`m3d_lit.inference` builds the model from its bundle (an export without `--merge` needs the base LLM
directory its bundle names, `llm_path`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from m3d_lit.commands.arguments import CommandParser
from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import Bundle
from m3d_lit.inference.loading import load_model
from m3d_lit.models.official.write import write_m3d
from m3d_lit.tokens import LAMED_TOKENS

__all__ = ["export", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_lamed(checkpoint: Path) -> tuple[Any, Bundle]:
    """(LamedModel with LoRA, its bundle)."""
    loaded = load_model(checkpoint, kind="lamed")
    if not hasattr(loaded.model.llm, "peft_config"):
        raise InputError(checkpoint, "holds a model without LoRA adapters: export needs stage 3")
    return loaded.model, loaded.bundle


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses views and shared storage: store independent contiguous copies
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _write_components(model: Any, folder: Path) -> None:
    _save_tensors(model.vision.state_dict(), folder / "vision.safetensors")
    _save_tensors(model.perceiver.state_dict(), folder / "perceiver.safetensors")
    seg = {f"segmentation.{k}": v for k, v in model.segmentation.state_dict().items()}
    seg.update({f"seg_head.{k}": v for k, v in model.seg_head.state_dict().items()})
    _save_tensors(seg, folder / "segmentation.safetensors")
    rows = model.new_tokens
    _save_tensors(
        {"token_ids": rows.token_ids, "input_rows": rows.input_rows, "output_rows": rows.output_rows},
        folder / "new_tokens.safetensors",
    )


def _write_merged(model: Any, folder: Path, dtype: torch.dtype, checkpoint: Path) -> None:
    """LoRA merged into the base weights and the new rows written into the matrices, then saved as `dtype`."""
    llm = model.llm.merge_and_unload()
    embedding, head = llm.get_input_embeddings().weight, llm.get_output_embeddings()
    head = None if head is None else head.weight
    rows = model.new_tokens
    if head is not None and head.data_ptr() == embedding.data_ptr():
        if not torch.equal(rows.input_rows, rows.output_rows):
            raise InputError(
                checkpoint,
                "its LLM ties the input and output embeddings but the trained rows differ: a merged model "
                "cannot hold both (export without --merge)",
            )
        head = None
    rows.write_back(embedding, head)
    tokenizer = model.tokenizer
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(llm.config, name, getattr(tokenizer, name))
        setattr(llm.generation_config, name, getattr(tokenizer, name))
    llm.to(dtype).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _manifest(model: Any, bundle: Bundle, checkpoint: Path) -> dict:
    return {
        "format": "m3d-lit export 2",
        "checkpoint": str(checkpoint.resolve()),
        "bundle": bundle.to_dict(),
        "num_visual_tokens": model.num_visual_tokens,
        "tokens": {t: model.tokenizer.convert_tokens_to_ids(t) for t in LAMED_TOKENS},
    }


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing an existing `out` only after `tmp` is complete."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def export(
    checkpoint: str | Path,
    out: str | Path,
    merge: bool = False,
    overwrite: bool = False,
    dtype: str | None = None,
    format: str = "m3d-lit",
) -> Path:
    """Write a stage-3 checkpoint's adapter and components (and the merged LLM with `merge`) to `out`.

    Args:
        checkpoint: a stage-3 (`FinetuneTask`) Lightning checkpoint, or its run or stage folder.
        out: the export folder; refused if it exists unless `overwrite`.
        merge: also write the merged Hugging Face model under `out/llm/`.
        overwrite: replace an existing `out`.
        dtype: weight dtype of the saved merged LLM (`float32`, `bfloat16`, `float16`; None: float32, or
            with `format="m3d"` the source directory's); the merge itself runs in the dtype the model
            loads in.
        format: `m3d-lit` (adapter + components) or `m3d` (M3D-LaMed's layout, see the module doc).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if format not in ("m3d-lit", "m3d"):
        raise InputError("format", f"{format!r} is not 'm3d-lit' or 'm3d'")
    dtype = dtype or ("float32" if format == "m3d-lit" else None)
    if dtype is not None and dtype not in DTYPES:
        raise InputError("dtype", f"{dtype!r} is not one of {sorted(DTYPES)}")
    if out.exists() and not (overwrite and out.is_dir()):
        raise InputError(
            out, "already exists: pass --overwrite to replace it" if out.is_dir() else "is a file"
        )
    if format == "m3d":
        return _export_m3d(checkpoint, out, dtype)
    model, bundle = _load_lamed(checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    tmp.mkdir(parents=True)
    try:
        model.llm.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
        model.tokenizer.save_pretrained(str(tmp / "adapter"))
        _write_components(model, tmp)
        manifest = _manifest(model, bundle, checkpoint)
        if merge:
            _write_merged(model, tmp / "llm", DTYPES[dtype], checkpoint)
        manifest["merged"] = merge
        text = json.dumps(manifest, indent=2, default=str)
        (tmp / "m3d_lit.json").write_text(text + "\n", encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_m3d(checkpoint: Path, out: Path, dtype: str | None) -> Path:
    loaded = load_model(checkpoint, kind="lamed")
    source = loaded.bundle.llm_path
    if not source:
        raise InputError(
            checkpoint, "was not built from an official M3D-LaMed directory: --format m3d needs one"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    try:
        write_m3d(loaded.model, Path(source), tmp, dtype)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """`m3d-lit export --checkpoint CKPT --out DIR [--format m3d-lit|m3d] [--merge] [--dtype D] [--overwrite]`."""
    parser = CommandParser(
        prog="m3d-lit export",
        description="Export a stage-3 checkpoint: the LoRA adapter (peft format), the vision, perceiver "
        "and segmentation weights, and with --merge a Hugging Face model with LoRA merged in.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="stage-3 checkpoint, or its run or stage folder (runs/stage3)"
    )
    parser.add_argument("--out", required=True, help="export folder (written as OUT.tmp, then renamed)")
    parser.add_argument("--merge", action="store_true", help="also write OUT/llm/: LoRA merged, new rows in")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weights of OUT/llm/ (float32), or with --format m3d of OUT "
        "(default: the source directory's torch_dtype)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--format",
        choices=("m3d-lit", "m3d"),
        default="m3d-lit",
        help="m3d: M3D-LaMed's own directory layout (a model built from an official directory)",
    )
    args = parser.parse_args(argv)
    if args.format == "m3d" and args.merge:
        parser.error("--merge is for --format m3d-lit (--format m3d always merges)")
    out = export(
        args.checkpoint,
        args.out,
        merge=args.merge,
        overwrite=args.overwrite,
        dtype=args.dtype,
        format=args.format,
    )
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0
