"""`Bundle`: the typed record every m3d-lit checkpoint carries, from which inference rebuilds the model.

A bundle says what the weights belong to without the training task: the model kind and its resolved
configuration, where the frozen LLM (or BERT) and its tokenizer come from, the LoRA adapters, a record of
the tokenizer, how each training source's scans were preprocessed (size and CT window), a fingerprint of
the training data, and which m3d-lit (version, git commit) wrote it. It is stored as a plain dict (what
`torch.load(weights_only=True)` and JSON hold) under `checkpoint["m3d_lit"]["bundle"]`, and as
`bundle` in an export folder's `m3d_lit.json`.

The CT window a model reads new scans with is decided here (`Bundle.scan_window`), from that record:
the window of its training sources, M3D's plain min-max for an official M3D-LaMed directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import m3d_lit
from m3d_lit.errors import InputError

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_WINDOW",
    "OFFICIAL_WINDOW",
    "Bundle",
    "SourcePreprocessing",
    "TokenizerRecord",
    "code_version",
    "llm_weights_hash",
]

BUNDLE_FORMAT = 1
# M3D min-maxes a volume over its whole range (no HU window): what an official model was trained on
OFFICIAL_WINDOW = "none"
# what a model whose training data are unknown reads scans with (m3d-lit's `prepare` default)
DEFAULT_WINDOW = "brain"
_SAMPLES_PER_TENSOR = 64


@dataclass(frozen=True)
class SourcePreprocessing:
    """How the scans of one training source were made into model input."""

    size: tuple[int, int, int] | None = None
    """Volume size (D, H, W); None when not known."""
    window: str | None = None
    """CT window (`data.preprocess.WINDOWS`); `none` is a plain min-max; None when not known."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SourcePreprocessing:
        data = data or {}
        size = data.get("size")
        size = None if size is None else tuple(int(s) for s in size)
        return cls(size, data.get("window"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TokenizerRecord:
    """Which tokenizer the model was trained with: a mismatch on load is refused, not decoded wrongly."""

    source: str | None
    """The directory it was read from; None: trained on m3d-lit's shipped corpus."""
    size: int
    """Its length, the added tokens included."""
    sha256: str
    """Hash of its vocabulary (every token with its id)."""

    @classmethod
    def of(cls, tokenizer: Any, source: str | Path | None) -> TokenizerRecord:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
        return cls(None if source is None else str(source), len(tokenizer), digest)


@dataclass(frozen=True)
class Bundle:
    """The record of one trained model (module docstring)."""

    kind: str
    """`lamed` (answers questions, stages 2-3) or `clip` (stage 1)."""
    config: dict[str, Any]
    """The resolved model configuration (`ModelConfig.to_dict()`)."""
    tokenizer: TokenizerRecord
    """The LLM's tokenizer (`lamed`) or the text encoder's (`clip`)."""
    llm_path: str | None = None
    """`lamed`: the directory the frozen LLM and its tokenizer are rebuilt from (an M3D-LaMed directory
    rebuilds the whole model); None: the LLM's weights are in the checkpoint."""
    llm_weights: str | None = None
    """Hash of sampled weights of the LLM before training (`llm_weights_hash`), to check `llm_path`."""
    text_path: str | None = None
    """`clip`: the BERT directory (None: built from the config, weights in the checkpoint)."""
    text_max_length: int | None = None
    """`clip`: the token limit of the texts it was trained on."""
    lora: dict[str, Any] | None = None
    """The LoRA settings of the adapters on the LLM, or None without adapters."""
    preprocessing: dict[str, SourcePreprocessing] = field(default_factory=dict)
    """Per training source (`cq500`, `physionet`, `m3d_vqa`, ...): its size and window."""
    data: str | None = None
    """Fingerprint of the training data (the DataModule's `fingerprint()`)."""
    task: str | None = None
    """The training task's class, `module.qualname`."""
    version: str = m3d_lit.__version__
    """The m3d-lit version that wrote the checkpoint."""
    commit: str | None = None
    """Its git commit (`+dirty` with uncommitted changes), None outside a git checkout."""
    notes: tuple[str, ...] = ()
    """What was assumed where the record was incomplete (an older checkpoint); not saved."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("notes")
        out["format"] = BUNDLE_FORMAT
        out["preprocessing"] = {k: asdict(v) for k, v in self.preprocessing.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | Path) -> Bundle:
        """Read `to_dict()`'s form; a record of a newer format or with unknown keys is refused."""
        data = dict(data)
        if data.pop("format", None) != BUNDLE_FORMAT:
            raise InputError(
                where,
                f"holds a model record of another format (m3d-lit {data.get('version')}): update m3d-lit "
                "to read it",
            )
        known = {f for f in cls.__dataclass_fields__ if f != "notes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                where,
                f"has a model record with keys this m3d-lit does not know ({unknown}): written by m3d-lit "
                f"{data.get('version')}? update m3d-lit to read it",
            )
        if not {"kind", "config", "tokenizer"} <= set(data):
            raise InputError(where, f"has a damaged model record (keys {sorted(data)})")
        data["tokenizer"] = TokenizerRecord(**data["tokenizer"])
        data["preprocessing"] = {
            str(k): SourcePreprocessing.from_dict(v) for k, v in (data.get("preprocessing") or {}).items()
        }
        return cls(**data)

    def with_notes(self, *notes: str) -> Bundle:
        return replace(self, notes=self.notes + tuple(n for n in notes if n))

    # -- the scans it reads -------------------------------------------------------------------------
    @property
    def img_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.config["img_size"])  # type: ignore[return-value]

    def windows(self) -> dict[str, str]:
        """The known window of each training source."""
        return {name: p.window for name, p in self.preprocessing.items() if p.window is not None}

    def scan_window(self, source: str | None = None) -> str:
        """The CT window a new scan is read with: its source's, or the one window all sources share.

        Without a known window (an older checkpoint) it is m3d-lit's default, `brain`. Sources read with
        different windows need `source`, or an `InputError` lists them.
        """
        windows = self.windows()
        if source is not None:
            if source not in windows:
                known = ", ".join(sorted(windows)) or "none recorded"
                raise InputError("--source", f"{source!r} is not a training source of this model ({known})")
            return windows[source]
        distinct = sorted(set(windows.values()))
        if len(distinct) > 1:
            listed = ", ".join(f"{name}: {window}" for name, window in sorted(windows.items()))
            raise InputError(
                "--source",
                f"this model was trained on sources read with different windows ({listed}): name the "
                "scan's source with --source",
            )
        return distinct[0] if distinct else DEFAULT_WINDOW

    def check_prepared(self, settings: Mapping[str, Any], where: str | Path) -> None:
        """Refuse prepared data (`prepare.json`: dataset, size, window) the model would misread."""
        size = settings.get("size")
        if size is not None and tuple(int(s) for s in size) != self.img_size:
            raise InputError(where, f"was prepared at size {list(size)}, but the model takes "
                                    f"{list(self.img_size)}: prepare it again with `m3d-lit prepare ... "
                                    f"--size {' '.join(map(str, self.img_size))}`")  # fmt: skip
        window, windows = settings.get("window"), self.windows()
        if window is None or not windows:
            return
        dataset = settings.get("dataset")
        want = windows.get(dataset) if dataset in windows else None
        allowed = {want} if want is not None else set(windows.values())
        if window not in allowed:
            which = f"{dataset} scans" if want is not None else "scans"
            raise InputError(
                where,
                f"was prepared with window {window!r}; this model reads {which} with window "
                f"{' or '.join(repr(w) for w in sorted(allowed))}: prepare it again with "
                f"`m3d-lit prepare ... --window {sorted(allowed)[0]}`",
            )


@functools.lru_cache(maxsize=1)
def code_version() -> tuple[str, str | None]:
    """(m3d-lit's version, the git commit of its source tree with `+dirty` for local changes, or None)."""
    source = Path(m3d_lit.__file__).resolve().parent
    try:

        def git(*args: str) -> str:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                raise OSError(done.stderr)
            return done.stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return m3d_lit.__version__, None
    return m3d_lit.__version__, commit + ("+dirty" if dirty else "")


def llm_weights_hash(llm: torch.nn.Module, round_to: torch.dtype | None = torch.bfloat16) -> str:
    """A hash of the names, shapes and evenly spaced values of an LLM's own (non-LoRA) weights.

    The values are first rounded to `round_to` (bf16 by default), so the hash is the same whatever dtype
    the LLM was loaded in: a run that made its frozen LLM in bf16 and an evaluation that reads the same
    directory in float32 agree. `round_to=None` hashes the values as held (what earlier versions did).
    """
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    digest = hashlib.sha256()
    named = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    for name in sorted(named):
        flat = named[name].detach().reshape(-1)
        digest.update(f"{name}:{tuple(named[name].shape)}".encode())
        if flat.numel() and not flat.is_meta:
            count = min(_SAMPLES_PER_TENSOR, flat.numel())
            index = torch.linspace(0, flat.numel() - 1, count, dtype=torch.float32, device="cpu").long()
            values = flat[index.to(flat.device)]
            values = values if round_to is None else values.to(round_to)
            digest.update(values.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def describe_model(
    model: torch.nn.Module,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    data: str | None = None,
    task: str | None = None,
    llm_path: str | Path | None = None,
    llm_weights: str | None = None,
    text_path: str | Path | None = None,
    text_max_length: int | None = None,
) -> Bundle:
    """The bundle of a built model (a `LamedModel` or a `ClipModel`) and what it was trained on.

    Args:
        model: the model whose weights the checkpoint holds.
        preprocessing: per training source, `{"size": ..., "window": ...}` (the DataModule's).
        data: the training data's fingerprint.
        task: the training task's class name.
        llm_path: the LLM directory the model was built from.
        llm_weights: `llm_weights_hash` of the LLM as built, before any training.
        text_path: the BERT directory of a CLIP model.
        text_max_length: a CLIP model's text token limit.
    """
    version, commit = code_version()
    # the adapters are the config's `lora` settings (a task applies them over the preset for its run)
    lora = model.config.lora.to_dict() if getattr(getattr(model, "llm", None), "peft_config", None) else None
    clip = hasattr(model, "text_tokenizer")
    tokenizer = model.text_tokenizer if clip else model.tokenizer
    return Bundle(
        kind="clip" if clip else "lamed",
        config=model.config.to_dict(),
        tokenizer=TokenizerRecord.of(tokenizer, text_path if clip else llm_path),
        llm_path=None if clip or llm_path is None else str(Path(llm_path).resolve()),
        llm_weights=None if clip else llm_weights,
        text_path=None if not clip or text_path is None else str(Path(text_path).resolve()),
        text_max_length=text_max_length if clip else None,
        lora=lora,
        preprocessing={str(k): SourcePreprocessing.from_dict(v) for k, v in (preprocessing or {}).items()},
        data=data,
        task=task,
        version=version,
        commit=commit,
    )
