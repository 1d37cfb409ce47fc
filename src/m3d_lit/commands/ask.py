"""`m3d-lit ask`: one question about one scan.

    m3d-lit ask --checkpoint checkpoints/stage3/last.ckpt --volume SCAN --question "Is there a fracture?"
                [--mask-out mask.nii.gz] [--max-new-tokens 64] [--device cpu|cuda]

`--checkpoint` may also name an official M3D-LaMed directory (config.json, weights, tokenizer): it answers
as the official demo does (its prompt, greedy decoding, its text), except that a `[SEG]` answered first
still gets its mask. SCAN is a DICOM series folder, a `.nii`/`.nii.gz` file or an `.npy` volume (an
`.npy` already at the model's size goes in unchanged). It goes through the same preprocessing as the
training data (window and size stored in the checkpoint; an official directory gets M3D's plain
min-max, window `none`). When the answer holds `[SEG]`, `--mask-out`
writes the predicted mask in the scan's own geometry, to lay over it in any viewer:
for a NIfTI scan a NIfTI with its shape and affine, for a DICOM series a NIfTI in the series' patient
coordinates (crop and resize undone, orientation restored). An `.npy` scan has no world coordinates: its
mask stays on the model's D x H x W grid, with an affine that says which way the model's axes point.
A `--mask-out` ending in `.npy` always gets the model grid (uint8 1 x D x H x W, like prepared masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from m3d_lit.commands.arguments import CommandParser
from m3d_lit.data.collate import make_collator
from m3d_lit.data.geometry import check_mask_path, write_mask
from m3d_lit.data.preprocess import Prepared, load_and_preprocess
from m3d_lit.errors import InputError
from m3d_lit.tasks.loading import load_task
from m3d_lit.tasks.official import scan_window

__all__ = ["Answer", "ask", "main"]


class Answer(NamedTuple):
    """What `ask` returns: the text, the mask logits (1 x D x H x W) or None, and the preprocessed scan."""

    text: str
    seg_logits: torch.Tensor | None
    prepared: Prepared


def ask(
    checkpoint: Path,
    volume: Path,
    question: str,
    max_new_tokens: int = 64,
    device: str = "cpu",
) -> Answer:
    """Answer `question` about `volume`."""
    if not question.strip():
        raise InputError("--question", "is empty")
    task, meta = load_task(checkpoint, device=device)
    model = task.model
    if not hasattr(model, "generate"):
        raise InputError(checkpoint, "is a stage-1 (contrastive) checkpoint: it cannot answer questions")
    size = tuple(model.img_size)
    prepared = load_and_preprocess(volume, size=size, window=scan_window(meta))
    item = {"id": volume.name, "image": torch.from_numpy(np.asarray(prepared.image, dtype=np.float32)),
            "question": question.strip(), "answer": "", "kind": "open", "mask": None, "dataset": "ask"}  # fmt: skip
    collate = make_collator(model, generation=True)
    batch = collate([item])
    with torch.no_grad():
        out = model.generate(
            batch["images"].to(device),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
        )
    return Answer(out["texts"][0].strip(), out["seg_logits"][0], prepared)


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="m3d-lit ask", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="stage-2/3 checkpoint or an M3D-LaMed directory"
    )
    parser.add_argument("--volume", required=True, type=Path, help="DICOM folder, .nii/.nii.gz or .npy")
    parser.add_argument("--question", required=True)
    parser.add_argument("--mask-out", type=Path, help="where to write the mask when the answer holds [SEG]")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens", f"{args.max_new_tokens} must be at least 1")
    if not args.volume.exists():
        raise InputError(args.volume, "does not exist")
    if args.mask_out is not None:
        check_mask_path(args.mask_out)
    answer = ask(args.checkpoint, args.volume, args.question, args.max_new_tokens, args.device)
    print(answer.text)
    if answer.seg_logits is not None and args.mask_out is not None:
        probabilities = answer.seg_logits.float().sigmoid()[0].cpu().numpy()
        write_mask(args.mask_out, probabilities, answer.prepared.geometry)
        print(f"mask written to {args.mask_out}")
    elif args.mask_out is not None:
        print("no [SEG] in the answer: no mask written")
    return 0
