"""`m3d-lit ask`: one question about one scan.

    m3d-lit ask --checkpoint checkpoints/stage3/last.ckpt --volume SCAN --question "Is there a fracture?"
                [--mask-out mask.nii.gz] [--max-new-tokens 64] [--device cpu|cuda]

SCAN is a DICOM series folder, a `.nii`/`.nii.gz` file or an `.npy` volume. It goes through the same
preprocessing as the training data (window and size stored in the checkpoint). When the answer holds
`[SEG]`, `--mask-out` writes the predicted mask as NIfTI on the preprocessed 1 x D x H x W grid (the
cropped and resized volume the model saw; spacing left at 1 mm).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from m3d_lit.arguments import CommandParser
from m3d_lit.errors import InputError

__all__ = ["ask", "main"]


def ask(
    checkpoint: Path,
    volume: Path,
    question: str,
    max_new_tokens: int = 64,
    device: str = "cpu",
) -> tuple[str, torch.Tensor | None, np.ndarray]:
    """Answer `question` about `volume`: (answer text, mask logits or None, the preprocessed volume)."""
    from m3d_lit.data.collate import LMCollator
    from m3d_lit.data.preprocess import load_and_preprocess
    from m3d_lit.tasks.loading import load_task

    if not question.strip():
        raise InputError("--question", "is empty")
    task, meta = load_task(checkpoint, device=device)
    model = task.model
    if not hasattr(model, "generate"):
        raise InputError(checkpoint, "is a stage-1 (contrastive) checkpoint: it cannot answer questions")
    settings = meta.get("preprocessing") or {}
    size = tuple(model.img_size)
    image = load_and_preprocess(volume, size=size, window=settings.get("window") or "brain").image
    item = {"id": volume.name, "image": torch.from_numpy(np.asarray(image, dtype=np.float32)),
            "question": question.strip(), "answer": "", "kind": "open", "mask": None, "dataset": "ask"}  # fmt: skip
    collate = LMCollator(model.tokenizer, model.num_visual_tokens, model.max_length, size, generation=True)
    batch = collate([item])
    with torch.no_grad():
        out = model.generate(
            batch["images"].to(device),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
        )
    return out["texts"][0].strip(), out["seg_logits"][0], image


def _write_mask(path: Path, logits: torch.Tensor) -> None:
    import nibabel as nib

    mask = (logits.float().sigmoid() > 0.5).cpu().numpy().astype(np.uint8)[0]  # D x H x W
    # NIfTI stores x (W), y (H), z (D); the model's grid is depth-first
    image = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), affine=np.eye(4))
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(path.name + ".tmp" + suffix)
    nib.save(image, str(tmp))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="m3d-lit ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
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
    answer, logits, _ = ask(args.checkpoint, args.volume, args.question, args.max_new_tokens, args.device)
    print(answer)
    if logits is not None and args.mask_out is not None:
        _write_mask(args.mask_out, logits)
        print(f"mask written to {args.mask_out}")
    elif args.mask_out is not None:
        print("no [SEG] in the answer: no mask written")
    return 0
