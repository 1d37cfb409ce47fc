"""`m3d-lit ask`: one question about one scan.

    m3d-lit ask --checkpoint runs/stage3 --volume SCAN --question "Is there a fracture?"
                [--mask-out mask.nii.gz] [--source NAME] [--max-new-tokens 64] [--device cpu|cuda]
                [--dtype auto|float32|bfloat16|float64]

`--checkpoint` is a checkpoint file, a run or stage folder, an `m3d-lit export` folder, or an official
M3D-LaMed directory (config.json, weights, tokenizer): that answers as the official demo does (its
prompt, greedy decoding, its text), except that a `[SEG]` answered first still gets its mask. SCAN is a
DICOM series folder (a folder of several series: the series `prepare` would pick, named in the output),
a `.nii`/`.nii.gz` file or an `.npy` volume (an `.npy` already at the model's size goes in unchanged).
It goes through the same preprocessing as the model's training data (size and CT window from the
checkpoint's record; an official directory gets M3D's plain min-max, window `none`); a model trained
on sources read with different windows needs `--source` to say which one the scan is like.
A closed (yes/no) question also gets P(Yes): the softmax of the first answer token's `Yes` and `No`
logits. When the answer holds `[SEG]`, `--mask-out` writes the predicted mask in the scan's own geometry,
to lay over it in any viewer: for a NIfTI scan a NIfTI with its shape and affine, for a DICOM series a
NIfTI in the series' patient coordinates (crop and resize undone, orientation restored). An `.npy` scan
has no world coordinates: its mask stays on the model's D x H x W grid, with an affine that says which
way the model's axes point. A `--mask-out` ending in `.npy` always gets the model grid (uint8
1 x D x H x W, like prepared masks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from m3d_lit.commands.arguments import CommandParser, answering_checkpoint_option, inference_options
from m3d_lit.data.geometry import check_mask_path
from m3d_lit.data.preprocess import Prepared
from m3d_lit.errors import InputError
from m3d_lit.inference.predictor import Prediction, Predictor

__all__ = ["Answer", "ask", "main"]


class Answer(NamedTuple):
    """What `ask` returns: the prediction (text, P(Yes), mask logits) and the preprocessed scan."""

    prediction: Prediction
    prepared: Prepared


def ask(predictor: Predictor, volume: Path, question: str, source: str | None = None) -> Answer:
    """Answer `question` about the scan at `volume`."""
    if not question.strip():
        raise InputError("--question", "is empty")
    prepared = predictor.read_scan(volume, source)
    (prediction,) = predictor.answer([predictor.request(prepared, question, id=volume.name)])
    return Answer(prediction, prepared)


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="m3d-lit ask", description=__doc__.split("\n\n")[0])
    answering_checkpoint_option(parser)
    parser.add_argument("--volume", required=True, type=Path, help="DICOM folder, .nii/.nii.gz or .npy")
    parser.add_argument("--question", required=True, help="the question, e.g. 'Is there a hemorrhage?'")
    parser.add_argument(
        "--mask-out",
        type=Path,
        help="where to write the mask when the answer holds [SEG] (default: no mask written)",
    )
    parser.add_argument(
        "--source",
        help="the training source the scan is like, when its windows differ (default: "
        "the window all the model's training sources share)",
    )
    inference_options(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens", f"{args.max_new_tokens} must be at least 1")
    if not args.question.strip():
        raise InputError("--question", "is empty")
    if not args.volume.exists():
        raise InputError(args.volume, "does not exist")
    if args.mask_out is not None:
        check_mask_path(args.mask_out)
    predictor = Predictor.load(args.checkpoint, args.device, args.dtype, args.max_new_tokens)
    answer = ask(predictor, args.volume, args.question, args.source)
    for note in predictor.loaded.notes:  # after the scan was read: a refusal stays one line
        print(f"m3d-lit ask: {note}", file=sys.stderr)
    read_from = answer.prepared.read_from
    if read_from is not None and read_from.is_dir():
        files = sum(1 for p in read_from.iterdir() if p.is_file())
        print(f"m3d-lit ask: read DICOM series {read_from} ({files} files)", file=sys.stderr)
    prediction = answer.prediction
    print(prediction.text)
    if prediction.p_yes is not None:
        print(f"P(Yes) = {prediction.p_yes:.4f}")
    if prediction.seg_logits is not None and args.mask_out is not None:
        prediction.write_mask(args.mask_out)
        print(f"mask written to {args.mask_out}")
    elif args.mask_out is not None:
        print("no [SEG] in the answer: no mask written")
    return 0
