"""The tokenizer of an official M3D-LaMed directory, and answers decoded to text as M3D decodes them.

The released directories ship a SentencePiece `tokenizer.model` for transformers' slow
`LlamaTokenizer`; their config.json's `auto_map` points `AutoTokenizer` at remote code, so the class is
chosen here (`LlamaTokenizer`, converted from the same files; it gives the slow tokenizer's ids on
every text of the parity kit: no dummy prefix after `<im_patch>`, `" [SEG]"` as two tokens).

Decoding is redone from the SentencePiece model: M3D's demo decodes with the slow tokenizer's
`batch_decode(ids, skip_special_tokens=True)`, which decodes runs of SentencePiece pieces with
SentencePiece itself (byte-fallback pieces included) and joins them and the added tokens that are not
special (`[SEG]`, Phi-3's chat tokens) with single spaces; the converted tokenizer decodes byte pieces
and those spaces differently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import LlamaTokenizer

from m3d_lit.errors import InputError
from m3d_lit.tokens import LAMED_TOKENS

__all__ = ["build_tokenizer", "m3d_decoder"]

SPIECE_UNDERLINE = "\u2581"


def build_tokenizer(directory: Path, rows: int) -> Any:
    """The directory's tokenizer; it must hold the four LaMed tokens below `rows` (embedding rows)."""
    if not any((directory / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise InputError(directory, "has no tokenizer (tokenizer.model or tokenizer.json)")
    try:
        tokenizer = LlamaTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(directory, f"tokenizer files are not loadable ({err})") from err
    vocab = tokenizer.get_vocab()
    absent = [t for t in LAMED_TOKENS if t not in vocab]
    if absent:
        raise InputError(directory, f"tokenizer lacks the M3D tokens {absent} (needs {list(LAMED_TOKENS)})")
    outside = [t for t in LAMED_TOKENS if vocab[t] >= rows]
    if outside:
        raise InputError(directory, f"tokenizer ids of {outside} lie beyond the {rows} embedding rows")
    if tokenizer.pad_token is None:  # as M3D's scripts do
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def m3d_decoder(directory: Path, tokenizer: Any) -> Callable[[list[int]], str] | None:
    """ids -> text as M3D's slow-tokenizer `decode(..., skip_special_tokens=True)`; None without
    `tokenizer.model` (a directory with `tokenizer.json` only then decodes with that tokenizer)."""
    model_file = directory / "tokenizer.model"
    if not model_file.is_file():
        return None
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = processor.get_piece_size()
    special = set(tokenizer.all_special_ids)
    added = {i: t for t, i in tokenizer.get_vocab().items() if i >= pieces}
    cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def run_text(run: list[str]) -> str:
        if run[0].startswith(SPIECE_UNDERLINE):  # the dummy prefix the encoder added
            run = [run[0][1:], *run[1:]]
        return processor.decode_pieces(run)

    def decode(ids: list[int]) -> str:
        parts: list[str] = []
        run: list[str] = []
        for token in (i for i in ids if i not in special):
            if token in added:
                if run:
                    text = run_text(run)
                    parts += [text] if text else []
                    run = []
                parts.append(added[token])
            elif 0 <= token < pieces:
                run.append(processor.id_to_piece(token))
        if run:
            parts.append(run_text(run))
        text = " ".join(parts)
        return tokenizer.clean_up_tokenization(text) if cleanup else text

    return decode
