"""Dice, BCE and CLIP losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from m3d_lit.losses.contrastive import clip_loss, recall_at_k
from m3d_lit.losses.segmentation import bce_loss, dice_loss


def test_dice_hand_computed_per_sample() -> None:
    # Sample 0: p = (0.5, 0.5), t = (1, 0): 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3.
    # Sample 1: p ~ (1, 0) exactly matching t: 1 - (2 + 1) / (1 + 1 + 1) = 0.
    # Sample 2: empty prediction of an empty mask: 1 - (0 + 1) / (0 + 0 + 1) = 0.
    logits = torch.tensor([[0.0, 0.0], [50.0, -50.0], [-50.0, -50.0]], dtype=torch.float64).view(3, 1, 2)
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64).view(3, 1, 2)
    loss = dice_loss(logits, target)
    assert loss.shape == (3,) and loss.dtype == torch.float64
    # float64, a few operations on values below 3: rounding stays below 1e-15 (sigmoid(50) = 1 - 2e-22)
    torch.testing.assert_close(loss, torch.tensor([1 / 3, 0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_losses_widen_half_precision_and_keep_float64() -> None:
    target = torch.tensor([[[1.0, 0.0]]])
    for loss in (dice_loss, bce_loss):
        assert loss(torch.zeros(1, 1, 2, dtype=torch.bfloat16), target).dtype == torch.float32
        assert loss(torch.zeros(1, 1, 2, dtype=torch.float64), target).dtype == torch.float64
    features = torch.eye(2, dtype=torch.bfloat16)
    assert clip_loss(features, features, 10.0).dtype == torch.float32


def test_dice_smooth_changes_value() -> None:
    logits = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    # smooth = 0: 1 - 2 * 0.5 / (1 + 1) = 0.5, every step exact in binary floating point
    assert torch.equal(dice_loss(logits, target, smooth=0.0), torch.tensor([0.5]))


def test_bce_hand_computed_per_sample() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, -2.0]], dtype=torch.float64).view(2, 1, 1, 2)
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    expected = [math.log(2.0), 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0)))]
    # float64 on values below 3: a few roundings of 1.1e-16 each
    torch.testing.assert_close(
        bce_loss(logits, target), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_losses_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 1, 4\).*\(2, 1, 3\)"):
        dice_loss(torch.zeros(2, 1, 4), torch.zeros(2, 1, 3))
    with pytest.raises(ValueError):
        bce_loss(torch.zeros(2, 4), torch.zeros(3, 4))


def test_clip_loss_matches_manual_and_is_symmetric() -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * img @ txt.t()
    manual = 0.0
    for i in range(5):
        manual += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    # float64, logits below 10 summed in another order: differences of ~1e-15
    torch.testing.assert_close(clip_loss(img, txt, scale), manual / 10, atol=1e-12, rtol=0)
    torch.testing.assert_close(clip_loss(img, txt, scale), clip_loss(txt, img, scale), atol=1e-12, rtol=0)


def test_clip_loss_small_for_aligned_pairs_and_checks_shapes() -> None:
    feats = torch.eye(4)
    assert clip_loss(feats, feats, 100.0) < 1e-6
    assert clip_loss(feats, feats.flip(0), 100.0) > 10
    with pytest.raises(ValueError, match="N x E"):
        clip_loss(torch.zeros(4, 3), torch.zeros(5, 3), 1.0)


def test_recall_at_k_known_ranks() -> None:
    # Row 0: match ranked 1st; row 1: 2nd; row 2: 3rd (columns 0 and 1 score higher).
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.7, 0.6, 0.1]])
    recall = recall_at_k(sim, ks=(1, 2, 5))
    assert recall["i2t_R@1"] == pytest.approx(1 / 3)
    assert recall["i2t_R@2"] == pytest.approx(2 / 3)
    assert recall["i2t_R@5"] == pytest.approx(1.0)
    # Text -> image: column 0 best at row 0; column 1 best is row 2 (0.6) before row 1 (0.5).
    assert recall["t2i_R@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3))
