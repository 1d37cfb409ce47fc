"""Slices of a scan as PNG images in the page: three planes, a window preset, masks as coloured overlays.

The images travel inside the HTML as data URIs, so the app writes no file per slider move and the page
needs nothing but its own server.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from m3d_lit.app.scans import Scan
from m3d_lit.data.preprocess import WINDOWS

__all__ = ["PLANES", "PRESETS", "OVERLAYS", "plane", "render", "views_html", "window"]

PLANES = ("axial", "coronal", "sagittal")
PRESETS = ("brain", "subdural", "bone")  # names in `preprocess.WINDOWS`
OVERLAYS = {"predicted": (255, 40, 40), "reference": (40, 220, 80)}
ALPHA = 0.45
WIDTH = 240  # pixels of each view's width in the page: three side by side


def window(display: np.ndarray, preset: str, hu: bool) -> np.ndarray:
    """Grey levels in [0, 1]: HU clipped to the preset's level and width, or values already in [0, 1]."""
    if not hu:
        return np.clip(display, 0.0, 1.0)
    level, width = WINDOWS[preset]  # type: ignore[misc]
    return np.clip((display - (level - width / 2)) / width, 0.0, 1.0)


def plane(volume: np.ndarray, name: str, index: int) -> np.ndarray:
    """One 2D slice of a D x H x W volume; coronal and sagittal with the head's top up."""
    if name == "axial":
        return volume[index]
    # axis 0 runs inferior -> superior: flip it so superior is the top row
    return (volume[:, index, :] if name == "coronal" else volume[:, :, index])[::-1]


def _shape(scan: Scan, name: str) -> tuple[int, int]:
    """Display (width, height) in pixels with the physical proportions of the plane (a cube if unknown)."""
    depth, rows, cols = scan.extent_mm or (1.0, 1.0, 1.0)
    across, down = {"axial": (cols, rows), "coronal": (cols, depth), "sagittal": (rows, depth)}[name]
    return WIDTH, max(8, round(WIDTH * down / across))


def render(grey: np.ndarray, overlays: list[tuple[np.ndarray, tuple[int, int, int]]], size) -> Image.Image:
    """An RGB image of a grey slice with each (mask, colour) blended over it, resized to `size`."""
    rgb = np.repeat((grey * 255.0)[..., None], 3, axis=-1)
    for mask, colour in overlays:
        hit = mask.astype(bool)
        rgb[hit] = (1 - ALPHA) * rgb[hit] + ALPHA * np.asarray(colour, dtype=np.float64)
    image = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    return image.resize(size, Image.NEAREST)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def views_html(
    scan: Scan | None,
    indices: dict[str, int],
    preset: str,
    shown: dict[str, bool],
    predicted: np.ndarray | None,
) -> str:
    """The three views as HTML (`img#m3d-axial`, ...), or a hint when no scan is loaded."""
    if scan is None:
        return "<p id='m3d-no-scan'>Load a scan to see it here.</p>"
    grey = window(scan.display, preset, scan.hu)
    masks = {"predicted": predicted, "reference": scan.reference}
    figures = []
    for name in PLANES:
        limit = grey.shape[0 if name == "axial" else 1 if name == "coronal" else 2] - 1
        index = min(max(int(indices.get(name, 0)), 0), limit)
        overlays = [
            (plane(mask, name, index), OVERLAYS[key])
            for key, mask in masks.items()
            if mask is not None and shown.get(key)
        ]
        uri = _data_uri(render(plane(grey, name, index), overlays, _shape(scan, name)))
        figures.append(
            f"<figure style='margin:0 8px 0 0;display:inline-block;vertical-align:top'>"
            f"<img id='m3d-{name}' alt='{name} slice {index}' src='{uri}'/>"
            f"<figcaption>{name} {index} (0-{limit})</figcaption></figure>"
        )
    note = "" if scan.hu else " (values already windowed when prepared: the presets need HU)"
    caption = f"<p id='m3d-scan-name'>{html.escape(scan.name)}{note}</p>"
    return caption + "<div>" + "".join(figures) + "</div>"
