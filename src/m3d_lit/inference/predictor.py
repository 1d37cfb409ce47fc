"""`Predictor`: a trained model answering questions about scans, the one way every command reaches it.

It owns the device and dtype (bf16 on CUDA, fp32 on CPU unless told otherwise), reading a scan as the
model's training data were read (the bundle's size and window), turning typed requests (a prepared scan
and a question) into a batch, generation, P(Yes) for closed questions, and masks in the scan's geometry.
`eval`, `ask`, `predict`, `bench`, the app, the validation examples and the tasks' `predict_step` use it;
nothing else builds a batch for inference.

No work is done twice: the visual tokens of a scan are computed once for all its questions (requests in
a row that share a volume share them, also across consecutive batches), a row that has finished its
answer leaves the batch (`LamedModel.generate`), and `Predictor.load` merges LoRA adapters into the
LLM's weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3d_lit.data.collate import make_collator
from m3d_lit.data.geometry import ScanGeometry, write_mask
from m3d_lit.data.preprocess import Prepared, load_and_preprocess
from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import Bundle
from m3d_lit.inference.loading import Loaded, load_model

__all__ = [
    "DTYPES",
    "Prediction",
    "Predictor",
    "Request",
    "inference_dtype",
    "is_closed_question",
    "yes_no_ids",
    "yes_probability",
]

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# the first word of a question that a plain "Yes" or "No" answers
_CLOSED_START = re.compile(
    r"^\s*(is|are|was|were|does|do|did|has|have|had|can|could|will|would|should|may|might)\b", re.IGNORECASE
)


def inference_dtype(device: str | torch.device, name: str = "auto") -> torch.dtype:
    """The weights' dtype for `name` (`auto`: bfloat16 on CUDA, float32 elsewhere)."""
    if name not in DTYPES:
        raise InputError("--dtype", f"{name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name] or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)


def is_closed_question(question: str) -> bool:
    """A yes/no question by its first word (`Is there ...?`, `Does ...?`), like the datasets' closed ones."""
    return bool(_CLOSED_START.match(question))


def yes_no_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The first token of an answer starting with `Yes`, and of one starting with `No`; None when both
    start with the same token (a SentencePiece model that splits off the word-start marker `▁`, as the
    parity kit's tiny one does), where the first token cannot tell them apart and no `p_yes` is given."""
    yes, no = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("Yes", "No"))
    return None if yes == no else (yes, no)


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> float:
    """P(Yes) against No from one row of first-token logits: a softmax over those two logits alone."""
    pair = torch.stack([logits[yes_id], logits[no_id]]).double()
    return float(torch.softmax(pair, dim=0)[0])


@dataclass(frozen=True)
class Request:
    """One question about one scan, the scan already made into the model's input."""

    question: str
    image: torch.Tensor
    """The prepared volume, float 1 x D x H x W at the model's size (`Predictor.read_scan`)."""
    id: str = ""
    closed: bool | None = None
    """Whether `p_yes` is wanted; None: when the question starts like a yes/no question."""
    geometry: ScanGeometry | None = None
    """What takes a mask back to the scan's file (None: masks stay on the model grid)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything the caller carries along (the reference answer, the kind, the dataset)."""


@dataclass
class Prediction:
    """The answer to one `Request`."""

    request: Request
    text: str
    ids: list[int]
    """The answer's token ids, up to and including its stop token."""
    p_yes: float | None
    """P(Yes) against No of the first answer token, for a closed question (None otherwise)."""
    seg_logits: torch.Tensor | None
    """Mask logits, float32 1 x D x H x W on the model grid, when the answer holds `[SEG]`."""

    def write_mask(self, path: str | Path) -> None:
        """The mask over the request's scan (its geometry), or on the model grid without one."""
        if self.seg_logits is None:
            raise ValueError("this answer holds no [SEG]: there is no mask to write")
        write_mask(path, self.seg_logits.float().sigmoid()[0].cpu().numpy(), self.request.geometry)


class Predictor:
    """A stage-2/3 model ready to answer (module docstring).

    Args:
        model: a `LamedModel`.
        bundle: its record (the window and size new scans are read with); None: the model's size and
            m3d-lit's default window.
        device: where it runs (default: the model's device).
        dtype: the weights' dtype: a `torch.dtype`, a name of `DTYPES`, or None to keep the model's.
        max_new_tokens: longest answer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        bundle: Bundle | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 64,
    ) -> None:
        if not hasattr(model, "generate"):
            raise InputError("model", "is a stage-1 (CLIP) model: it cannot answer questions")
        if max_new_tokens < 1:
            raise InputError("--max-new-tokens", f"{max_new_tokens} must be at least 1")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if isinstance(dtype, str):
            dtype = inference_dtype(self.device, dtype)
        model.to(self.device) if dtype is None else model.to(self.device, dtype)
        self.model, self.bundle, self.max_new_tokens = model, bundle, max_new_tokens
        size = tuple(int(s) for s in model.img_size)
        self.img_size: tuple[int, int, int] = size  # type: ignore[assignment]
        self.collate = make_collator(model, generation=True)
        self.yes_no = yes_no_ids(model.tokenizer)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (volume, its visual tokens)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 64,
    ) -> Predictor:
        """Load any checkpoint kind (`load_model`), merge LoRA into the LLM, and place it.

        Args:
            checkpoint: a checkpoint file, a run or stage folder, an export folder or an official directory.
            device: where it runs (None: CUDA when there is one, else the CPU).
            dtype: `auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float64`; the
                merge runs in the weights' saved dtype (float32), before the cast.
            max_new_tokens: longest answer.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(checkpoint, kind="lamed")
        llm = loaded.model.llm
        if hasattr(llm, "merge_and_unload"):
            loaded.model.llm = llm.merge_and_unload()
        predictor = cls(loaded.model, loaded.bundle, device, dtype, max_new_tokens)
        predictor.loaded = loaded
        return predictor

    loaded: Loaded | None = None
    """What `load` read (source, notes); None for a model handed over directly."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def window(self, source: str | None = None) -> str:
        """The CT window scans are read with (`Bundle.scan_window`)."""
        return Bundle.scan_window(self.bundle, source) if self.bundle is not None else "brain"

    def read_scan(self, path: str | Path, source: str | None = None) -> Prepared:
        """A raw scan (DICOM series folder, NIfTI, `.npy`) made into the model's input as training did."""
        return load_and_preprocess(path, size=self.img_size, window=self.window(source))

    def request(self, prepared: Prepared, question: str, **kwargs: Any) -> Request:
        """A `Request` for a scan `read_scan` made."""
        image = torch.from_numpy(np.asarray(prepared.image, dtype=np.float32))
        return Request(question.strip(), image, geometry=prepared.geometry, **kwargs)

    # -- answering --------------------------------------------------------------------------------
    def _visual(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows' volumes B x 1 x D x H x W, their visual tokens), each distinct volume encoded once.

        Consecutive rows that hold the same volume share its tokens; within one `predict`, the previous
        batch's last volume is kept, so a scan whose questions span two batches is not encoded again.
        """
        groups: list[int] = []
        distinct: list[torch.Tensor] = []
        for image in images:
            if distinct and (image is distinct[-1] or torch.equal(image, distinct[-1])):
                groups.append(len(distinct) - 1)
            else:
                groups.append(len(distinct))
                distinct.append(image)
        dtype = next(self.model.parameters()).dtype
        volumes = torch.stack(distinct).to(self.device, dtype)
        reuse = self._last is not None and self._last[0].shape == distinct[0].shape
        reuse = reuse and torch.equal(self._last[0], distinct[0])  # type: ignore[index]
        todo = volumes[1:] if reuse else volumes
        tokens = self.model.encode_images(todo) if len(todo) else None
        if reuse:
            kept = self._last[1]  # type: ignore[index]
            tokens = kept if tokens is None else torch.cat([kept, tokens])
        self._last = (distinct[-1], tokens[-1:])
        index = torch.tensor(groups, device=self.device)
        return volumes.index_select(0, index), tokens.index_select(0, index)

    def answer(
        self, requests: Sequence[Request], on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> list[Prediction]:
        """Answer one batch of requests (greedy); `on_step` as `LamedModel.generate`'s."""
        self._last = None  # the weights may have changed since the last call (validation examples)
        return self._answer(requests, on_step)

    @torch.no_grad()
    def _answer(
        self, requests: Sequence[Request], on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> list[Prediction]:
        if not requests:
            return []
        for request in requests:
            if not request.question.strip():
                raise InputError("question", f"request {request.id or '?'} is empty")
        items = [
            {"id": r.id, "image": r.image, "question": r.question.strip(), "answer": "", "kind": "open",
             "mask": None, "dataset": ""}
            for r in requests
        ]  # fmt: skip
        batch = self.collate(items)
        images, visual = self._visual([item["image"] for item in items])
        out = self.model.generate(
            images,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            max_new_tokens=self.max_new_tokens,
            on_step=on_step,
            visual=visual,
        )
        predictions = []
        for i, request in enumerate(requests):
            closed = is_closed_question(request.question) if request.closed is None else request.closed
            p_yes = yes_probability(out["first_logits"][i], *self.yes_no) if closed and self.yes_no else None
            seg = out["seg_logits"][i]
            seg = None if seg is None else seg.float().cpu()
            predictions.append(Prediction(request, out["texts"][i].strip(), out["ids"][i], p_yes, seg))
        return predictions

    def predict(self, requests: Iterable[Request], batch_size: int = 8) -> Iterator[Prediction]:
        """Answer requests in batches of `batch_size`, in their order (keep a scan's questions together:
        its visual tokens are then computed once)."""
        if batch_size < 1:
            raise InputError("--batch-size", f"{batch_size} must be at least 1")
        self._last = None
        pending: list[Request] = []
        try:
            for request in requests:
                pending.append(request)
                if len(pending) == batch_size:
                    yield from self._answer(pending)
                    pending = []
            yield from self._answer(pending)
        finally:
            self._last = None
