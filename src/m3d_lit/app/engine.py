"""The model side of `m3d-lit app`: one checkpoint, one generation at a time, answers streamed token by token.

Loading, preprocessing settings, prompting, generation and P(Yes) are the `Predictor`'s
(`m3d_lit.inference`); this module only adds the pieces a browser needs: the partial answer after each
token, and a lock so that several sessions queue for the model instead of running on it at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m3d_lit.data.geometry import ScanGeometry
from m3d_lit.data.geometry import write_mask as geometry_write_mask
from m3d_lit.errors import InputError
from m3d_lit.inference.predictor import Predictor, Request, is_closed_question, yes_probability

__all__ = ["Answer", "Engine", "is_closed_question", "write_mask"]


@dataclass(frozen=True)
class Answer:
    """The answer so far: `text` grows while `done` is False; the last one holds the mask logits."""

    text: str
    p_yes: float | None = None
    seg_logits: torch.Tensor | None = None
    done: bool = False


def write_mask(path: Path, seg_logits: torch.Tensor, geometry: ScanGeometry | None) -> None:
    """The predicted mask as `m3d-lit ask --mask-out` writes it: over the uploaded scan's own geometry,
    or on the model grid when there is none (`.npy` and prepared scans)."""
    geometry_write_mask(path, seg_logits.float().sigmoid()[0].cpu().numpy(), geometry)


class Engine:
    """A stage-2/3 model ready to answer, shared by every session of the app.

    Args:
        checkpoint: any checkpoint `Predictor.load` reads (file, run or stage folder, export folder,
            M3D-LaMed directory).
        device: `cpu` or `cuda`.
        max_new_tokens: longest answer.
        dtype: `auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float64`.
        source: the training source uploads are read like (a model whose sources' windows differ).
    """

    def __init__(
        self,
        checkpoint: Path,
        device: str = "cpu",
        max_new_tokens: int = 64,
        dtype: str = "auto",
        source: str | None = None,
    ) -> None:
        self.predictor = Predictor.load(checkpoint, device, dtype, max_new_tokens)
        self.model = self.predictor.model
        self.size: tuple[int, int, int] = self.predictor.img_size
        self.window: str = self.predictor.window(source)
        self._lock = threading.Lock()

    def _generate(self, image: np.ndarray, question: str, steps: queue.Queue) -> None:
        """Runs in a worker thread: one generation under the lock, each step and the result into `steps`."""
        request = Request(question, torch.from_numpy(np.asarray(image, dtype=np.float32)), id="app")
        try:
            with self._lock:
                (prediction,) = self.predictor.answer(
                    [request], on_step=lambda logits, ids: steps.put(("step", logits[0].cpu(), int(ids[0])))
                )
            steps.put(("done", prediction, None))
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
        p_yes, yes_no = None, self.predictor.yes_no
        while True:
            kind, value, extra = steps.get()
            if kind == "error":
                raise value
            if kind == "done":
                yield Answer(value.text, value.p_yes, value.seg_logits, done=True)
                return
            if not ids and yes_no is not None and is_closed_question(question):
                p_yes = yes_probability(value, *yes_no)  # shown while the rest of the answer streams
            ids.append(extra)
            yield Answer(self.model._detokenize(ids), p_yes)

    def answer(self, image: np.ndarray, question: str) -> Answer:
        """The final `Answer` of `stream`."""
        *_, last = self.stream(image, question)
        return last
