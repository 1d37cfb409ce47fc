"""The model side of `m3d-lit app`: one checkpoint, one generation at a time, answers streamed token by token.

Checkpoint loading, preprocessing settings, prompting and generation are the project's own (`load_task`,
`make_collator`, `LamedModel.generate`); this module only adds the pieces a browser needs: the partial answer
after each token, the probability of "Yes" for a closed question, and a lock so that several sessions
queue for the model instead of running on it at once.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m3d_lit.data.collate import make_collator
from m3d_lit.data.geometry import ScanGeometry
from m3d_lit.data.geometry import write_mask as geometry_write_mask
from m3d_lit.errors import InputError
from m3d_lit.evaluation.generation import yes_no_ids, yes_probability
from m3d_lit.tasks.loading import load_task
from m3d_lit.tasks.official import scan_window

__all__ = ["Answer", "Engine", "is_closed_question", "write_mask"]

# the first word of a question that a plain "Yes" or "No" answers
_CLOSED_START = re.compile(
    r"^\s*(is|are|was|were|does|do|did|has|have|had|can|could|will|would|should|may|might)\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Answer:
    """The answer so far: `text` grows while `done` is False; the last one holds the mask logits."""

    text: str
    p_yes: float | None = None
    seg_logits: torch.Tensor | None = None
    done: bool = False


def is_closed_question(question: str) -> bool:
    """A yes/no question by its first word (`Is there ...?`, `Does ...?`), as the datasets' closed ones are."""
    return bool(_CLOSED_START.match(question))


def write_mask(path: Path, seg_logits: torch.Tensor, geometry: ScanGeometry | None) -> None:
    """The predicted mask as `m3d-lit ask --mask-out` writes it: over the uploaded scan's own geometry,
    or on the model grid when there is none (`.npy` and prepared scans)."""
    geometry_write_mask(path, seg_logits.float().sigmoid()[0].cpu().numpy(), geometry)


class Engine:
    """A stage-2/3 checkpoint ready to answer, shared by every session of the app.

    Args:
        checkpoint: an m3d-lit checkpoint (`load_task`).
        device: `cpu` or `cuda` (bf16 there, as `m3d-lit eval`).
        max_new_tokens: longest answer.
    """

    def __init__(self, checkpoint: Path, device: str = "cpu", max_new_tokens: int = 64) -> None:
        task, meta = load_task(checkpoint, device=device)
        model = task.model
        if not hasattr(model, "generate"):
            raise InputError(checkpoint, "is a stage-1 (contrastive) checkpoint: it cannot answer questions")
        if torch.device(device).type == "cuda":
            model.to(torch.bfloat16)
        self.model, self.device, self.max_new_tokens = model, device, max_new_tokens
        self.size: tuple[int, int, int] = tuple(int(s) for s in model.img_size)  # type: ignore[assignment]
        self.window: str = scan_window(meta)
        self.collate = make_collator(model, generation=True)
        self.yes_no = yes_no_ids(model.tokenizer)
        self._lock = threading.Lock()

    def _generate(self, image: np.ndarray, question: str, steps: queue.Queue) -> None:
        """Runs in a worker thread: one generation under the lock, each step and the result into `steps`."""
        item = {"id": "app", "image": torch.from_numpy(np.asarray(image, dtype=np.float32)),
                "question": question, "answer": "", "kind": "open", "mask": None, "dataset": "app"}  # fmt: skip
        try:
            batch = self.collate([item])
            with self._lock, torch.no_grad():
                out = self.model.generate(
                    batch["images"].to(self.device),
                    batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device),
                    max_new_tokens=self.max_new_tokens,
                    on_step=lambda logits, ids: steps.put(("step", logits[0].cpu(), int(ids[0]))),
                )
            steps.put(("done", out["texts"][0].strip(), out["seg_logits"][0]))
        except Exception as err:  # handed to the consumer, which re-raises it in the caller's thread
            steps.put(("error", err, None))

    def stream(self, image: np.ndarray, question: str) -> Iterator[Answer]:
        """Answer `question` about a preprocessed 1 x D x H x W volume, yielding the text as it grows.

        Waits for any generation already running (one at a time on the model). P(Yes) is given for a
        closed question (`is_closed_question`) when "Yes" and "No" start with different tokens.
        """
        question = question.strip()
        if not question:
            raise InputError("question", "is empty")
        if tuple(image.shape) != (1, *self.size):
            raise ValueError(f"volume of shape {tuple(image.shape)}, the model needs {(1, *self.size)}")
        steps: queue.Queue = queue.Queue()
        threading.Thread(target=self._generate, args=(image, question, steps), daemon=True).start()
        ids: list[int] = []
        p_yes = None
        while True:
            kind, value, extra = steps.get()
            if kind == "error":
                raise value
            if kind == "done":
                yield Answer(value, p_yes, extra, done=True)
                return
            if not ids and self.yes_no is not None and is_closed_question(question):
                p_yes = yes_probability(value, *self.yes_no)
            ids.append(extra)
            yield Answer(self.model._detokenize(ids), p_yes)

    def answer(self, image: np.ndarray, question: str) -> Answer:
        """The final `Answer` of `stream`."""
        *_, last = self.stream(image, question)
        return last
