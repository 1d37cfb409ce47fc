"""Train-time augmentation as in M3D, seeded per sample so runs are reproducible and resumable."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ALL_AXES", "BRAIN_CT_FLIP_AXES", "VolumeAugment", "sample_seed"]

ALL_AXES: tuple[int, ...] = (0, 1, 2)
# Any mirror reverses handedness, so after it a left-sided bleed looks like a right-sided one and the
# brain-CT answers that name a side become wrong. Rotations keep handedness, so they stay on.
BRAIN_CT_FLIP_AXES: tuple[int, ...] = ()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index), whatever worker or rank loads the sample."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class VolumeAugment:
    """M3D's train transforms on a 1 x D x H x W volume and its mask.

    RandRotate90 in the (H, W) plane, RandFlip on each of ``flip_axes`` (spatial axes: 0 = D, 1 = H,
    2 = W), RandScaleIntensity and RandShiftIntensity. Rotations and flips move the mask with the image;
    intensity changes touch the image only. A volume whose H and W differ (a size the user chose, or a
    published model's input) cannot turn by 90 degrees and keep its shape: it turns by 180 degrees instead,
    the one in-plane rotation that keeps it (and keeps left and right apart, as every rotation does).

    Args:
        flip_axes: spatial axes that may be mirrored; brain-CT DataModules default to none
            (``BRAIN_CT_FLIP_AXES``) because a mirror swaps left and right.
        rotate_prob: probability of a 90/180/270 degree in-plane rotation (180 where H != W).
        flip_prob: probability of a flip, per axis.
        intensity: factor range of the intensity scale and offset range of the shift.
        intensity_prob: probability of each intensity change.
    """

    def __init__(
        self,
        flip_axes: Sequence[int] = ALL_AXES,
        rotate_prob: float = 0.5,
        flip_prob: float = 0.1,
        intensity: float = 0.1,
        intensity_prob: float = 0.5,
    ) -> None:
        bad = [a for a in flip_axes if a not in ALL_AXES]
        if bad:
            raise ValueError(
                f"flip_axes {tuple(flip_axes)} has axes {bad}; spatial axes are 0, 1, 2 (D, H, W)"
            )
        for name, p in (
            ("rotate_prob", rotate_prob),
            ("flip_prob", flip_prob),
            ("intensity_prob", intensity_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.flip_axes = tuple(flip_axes)
        self.rotate_prob = rotate_prob
        # Imported here: `import monai` loads its whole network zoo (transformers' BERT included), ~5 s
        # that every `m3d-lit eval` and every run without augmentation would pay for nothing.
        from monai import transforms as mt

        geo = ["image", "mask"]
        rest = [
            *[
                mt.RandFlipd(geo, prob=flip_prob, spatial_axis=a, allow_missing_keys=True)
                for a in self.flip_axes
            ],
            mt.RandScaleIntensityd("image", factors=intensity, prob=intensity_prob),
            mt.RandShiftIntensityd("image", offsets=intensity, prob=intensity_prob),
        ]
        self.transform = mt.Compose(
            [mt.RandRotate90d(geo, prob=rotate_prob, spatial_axes=(1, 2), allow_missing_keys=True), *rest]
        )
        half_turn = mt.RandLambdad(
            geo, func=lambda x: torch.flip(x, dims=(-2, -1)), prob=rotate_prob, allow_missing_keys=True
        )
        self.transform_non_square = mt.Compose([half_turn, *rest])

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment ``image`` (and ``mask``) with the draws that ``seed`` fixes."""
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected a 1 x D x H x W volume, got shape {tuple(image.shape)}")
        transform = self.transform if image.shape[2] == image.shape[3] else self.transform_non_square
        # in float32 whatever the cache holds: the intensity changes make values float16 cannot hold
        image = image.float()
        data = {"image": image} if mask is None else {"image": image, "mask": mask}
        transform.set_random_state(seed=seed)
        out = transform(data)
        new_mask = None if mask is None else _plain(out["mask"])
        return _plain(out["image"]), new_mask


def _plain(x: torch.Tensor) -> torch.Tensor:
    """MONAI returns MetaTensors; batches carry plain contiguous float32 tensors."""
    tensor = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return tensor.contiguous().float()
