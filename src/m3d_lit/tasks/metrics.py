"""Validation metrics as torchmetrics `Metric`s: exact epoch values, whatever the batch size or rank count.

Each metric keeps sums (or, for retrieval, the features themselves) and divides only in `compute`, which
torchmetrics synchronises across DDP ranks: the epoch value is the one a single process gets over the
same samples, not a mean of per-batch means. Counts are integers and sums float64, so the only difference
between one process and several is the order of float64 additions (relative 1e-15).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from m3d_lit.losses.contrastive import recall_at_k
from m3d_lit.losses.segmentation import hard_dice_iou

__all__ = ["MeanDice", "RetrievalRecall", "TokenAccuracy"]


class TokenAccuracy(Metric):
    """Share of answer tokens predicted exactly (the argmax token equals the label), over every token seen.

    The model runs its LM head only where a label is trained and returns the argmax token there with its
    label (`LamedModel.forward`'s `predicted` and `targets`), so this counts exactly what the full logits
    would give at the labelled positions. `compute` gives NaN before any answer token was seen.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, targets: Tensor) -> None:
        """predicted and targets: N token ids each (the labelled positions of a batch)."""
        if predicted.shape != targets.shape or predicted.dim() != 1:
            raise ValueError(
                f"predicted {tuple(predicted.shape)} and targets {tuple(targets.shape)} must be N, N"
            )
        self.correct += (predicted == targets).sum()
        self.total += targets.numel()

    def compute(self) -> Tensor:
        return self.correct.double() / self.total if self.total > 0 else torch.tensor(float("nan"))


class MeanDice(Metric):
    """Mean over samples of each sample's Dice, mask = sigmoid(logits) > 0.5 (`hard_dice_iou` of
    `losses.segmentation`, as evaluation scores it: both masks empty count 1). `compute` gives NaN before
    any sample was seen."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("dice_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, masks: Tensor) -> None:
        """logits and masks N x ... (one sample per row); foreground: logits > 0, masks > 0.5."""
        dice, _ = hard_dice_iou(logits > 0, masks > 0.5)
        self.dice_sum += dice.sum()
        self.samples += dice.numel()

    def compute(self) -> Tensor:
        return self.dice_sum / self.samples if self.samples > 0 else torch.tensor(float("nan"))


class RetrievalRecall(Metric):
    """Image-to-text and text-to-image recall@k over every pair seen (pair i: image i with text i).

    The features of all ranks are concatenated in `compute`, so each image competes with every text of the
    epoch, as in one process. `compute` gives `{"i2t_R@k": ..., "t2i_R@k": ...}` (see
    `losses.contrastive.recall_at_k`), or an empty dict before any pair was seen.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")

    def update(self, image: Tensor, text: Tensor) -> None:
        """image and text features, N x E each."""
        if image.shape != text.shape or image.dim() != 2:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be N x E")
        self.image.append(image.detach().double())
        self.text.append(text.detach().double())

    def compute(self) -> dict[str, float]:
        if isinstance(self.image, list) and not self.image:
            return {}
        image, text = dim_zero_cat(self.image), dim_zero_cat(self.text)  # a list, or one tensor once synced
        return recall_at_k(image @ text.T, self.ks)
