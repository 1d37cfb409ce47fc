"""WordNet 3.0 and the Porter stemmer as METEOR calls them, offline and memoised (both text protocols).

`require_wordnet` finds WordNet in the nltk data folder (`make setup` writes `.venv/nltk_data`) or says in
one line how to install it; `meteor_tools` gives the reader and the stemmer METEOR takes; `stemmer` the
memoised Porter stemmer that ROUGE's tokenizer shares.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from m3d_lit.errors import InputError

__all__ = ["WordNetMissingError", "meteor_tools", "nltk_data_dirs", "require_wordnet", "stemmer"]

_WORDNET_VERSION = "3.0"


class WordNetMissingError(InputError):
    """WordNet 3.0, which METEOR needs, is not in the nltk data folder (the message says how to fix it)."""


def nltk_data_dirs() -> list[Path]:
    """Where WordNet is looked for: the `NLTK_DATA` folders if set, else `<sys.prefix>/nltk_data`.

    `make setup` writes `.venv/nltk_data`, and `.venv` is `sys.prefix` when run from the venv, so
    `.venv/bin/m3d-lit score` needs no environment variable.
    """
    env = os.environ.get("NLTK_DATA", "")
    if env.strip():
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [Path(sys.prefix) / "nltk_data"]


def require_wordnet() -> Any:
    """The WordNet 3.0 reader METEOR uses; raises `WordNetMissingError` saying how to install it."""
    return _load_wordnet(tuple(str(d) for d in nltk_data_dirs()))


@functools.lru_cache(maxsize=4)
def _load_wordnet(dirs: tuple[str, ...]) -> Any:
    import nltk

    for folder in dirs:
        if not Path(folder, "corpora").is_dir():
            continue
        # nltk only reads corpora under its data path (a security check), so the folder joins it.
        if folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a refusal warns; the error below says it better
                root = nltk.data.find("corpora/wordnet", paths=[folder])
        except LookupError:
            if Path(folder, "corpora", "wordnet", "lexnames").is_file():
                raise WordNetMissingError(
                    Path(folder, "corpora", "wordnet"),
                    "WordNet is there but nltk will not read it: it or a file in it is writable by "
                    "another account or owned by another user. Fix: `chmod -R go-w` that folder, or "
                    "re-run `make setup`",
                ) from None
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
            reader = _english_wordnet_class()(root, None)
        found = reader.get_version()
        if found != _WORDNET_VERSION:
            raise WordNetMissingError(
                f"{folder}/corpora/wordnet",
                f"holds WordNet {found}, but METEOR here is defined with WordNet {_WORDNET_VERSION}; "
                "run `make setup` into a fresh folder or point NLTK_DATA at WordNet 3.0",
            )
        return reader
    raise WordNetMissingError(
        os.pathsep.join(dirs),
        "WordNet 3.0 is missing (METEOR needs it; looked for corpora/wordnet/ with lexnames in "
        "NLTK_DATA, or in <venv>/nltk_data when NLTK_DATA is unset). Fix: run `make setup` (writes "
        ".venv/nltk_data offline from Debian's wordnet-base), or `bash scripts/setup_wordnet.sh DIR` "
        "and set NLTK_DATA=DIR",
    )


def _english_wordnet_class() -> type:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        """nltk's reader without the sense map to WordNet 3.0 that only multilingual (OMW) data uses.

        This nltk builds that map at load even for WordNet 3.0 itself (8 s of reading index.sense
        twice); upstream skips it for 3.0. English `synsets`, all METEOR uses, never reads it.
        """

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return EnglishWordNet


class _CachedStemmer:
    """nltk's Porter stemmer with memory: ROUGE and METEOR stem every token of every sample."""

    def __init__(self) -> None:
        from nltk.stem.porter import PorterStemmer

        self.stem = functools.lru_cache(maxsize=None)(PorterStemmer().stem)


class _CachedWordNet:
    """The one WordNet call METEOR makes (`synsets`), memoised: answers repeat the same few words."""

    def __init__(self, reader: Any) -> None:
        self._synsets = functools.lru_cache(maxsize=None)(reader.synsets)

    def synsets(self, word: str) -> Any:
        return self._synsets(word)


@functools.lru_cache(maxsize=1)
def stemmer() -> _CachedStemmer:
    """The one memoised Porter stemmer (ROUGE's tokenizer and METEOR share it)."""
    return _CachedStemmer()


def meteor_tools() -> tuple[Any, Any]:
    """nltk's WordNet 3.0 reader and Porter stemmer as METEOR calls them, memoised (same values)."""
    return _CachedWordNet(require_wordnet()), stemmer()
