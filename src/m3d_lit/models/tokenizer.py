"""Tokenizers: from a local model directory, or trained here on the shipped brain-CT corpus.

Nothing is downloaded. Without a path, a byte-level BPE (LLM) or a WordPiece (BERT) tokenizer is trained
deterministically on `m3d_lit/assets/brain_ct_corpus.txt` (well under a second), so the tiny presets have
real tokenizers whose question and answer words are single tokens.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from m3d_lit.errors import InputError
from m3d_lit.tokens import LAMED_TOKENS

__all__ = [
    "build_llm_tokenizer",
    "build_text_tokenizer",
    "add_lamed_tokens",
    "corpus_lines",
]

CORPUS = "brain_ct_corpus.txt"
LLM_VOCAB = 2048
TEXT_VOCAB = 2048


def corpus_lines() -> list[str]:
    """The shipped tokenizer-training corpus, one sentence per line."""
    text = resources.files("m3d_lit").joinpath("assets", CORPUS).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_VOCAB,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    # Like LLaMA's tokenizer: BOS in front, EOS left to the collator (it ends the answer).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def _wordpiece_vocab(tok: Tokenizer, special: list[str]) -> dict[str, int]:
    """Special tokens, every character (alone and as `##` suffix), then corpus words by frequency.

    Built here rather than by the `tokenizers` WordPiece trainer, whose order of equally frequent pieces
    changes between processes: a checkpoint must find the same ids in every process that loads it.
    """
    counts: dict[str, int] = {}
    for line in corpus_lines():
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    pieces = [*special, *chars, *(f"##{c}" for c in chars)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[: max(0, TEXT_VOCAB - len(pieces))]
    return {piece: i for i, piece in enumerate(pieces)}


@functools.lru_cache(maxsize=1)
def _trained_wordpiece_json() -> str:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.model = models.WordPiece(vocab=_wordpiece_vocab(tok, special), unk_token="[UNK]")
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok.to_str()


def _from_directory(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise InputError(path, f"no usable tokenizer files ({err})") from err


def add_lamed_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Add `<im_patch>`, `<bx_start>`, `<bx_end>`, `[SEG]` (and a pad token if missing) as special tokens.

    Returns the ids of the tokens this call added (the rows the LLM embeddings must gain); tokens already
    present are left alone.
    """
    before = set(tokenizer.get_vocab())
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    missing = [t for t in LAMED_TOKENS if t not in before]
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
    )
    return sorted(i for t, i in tokenizer.get_vocab().items() if t not in before)


def build_llm_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The LLM tokenizer with the LaMed special tokens added.

    Args:
        path: a local model directory (e.g. LLaMA-2-7B); None trains the byte-level BPE on the corpus.
    """
    if path is not None:
        tokenizer = _from_directory(path)
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_trained_bpe_json()),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
    add_lamed_tokens(tokenizer)
    return tokenizer


def build_text_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The text-encoder (BERT) tokenizer.

    Args:
        path: a local BERT directory; None trains the WordPiece tokenizer on the corpus.
    """
    if path is not None:
        return _from_directory(path)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_wordpiece_json()),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
