"""Judge a picture of the shapes world by pixel statistics (no learned model).

- Every pixel takes the nearest colour of :data:`renderfarm.shapes.COLORS` (pixels far from all
  of them are left out).
- The background is the commonest colour of the picture's border (a 3-pixel frame).
- The shapes are the connected regions (4-neighbours) of other colours, 12 pixels or more; the
  shape's colour is the commonest colour in them, the count is how many there are.
- A region's shape is the one of a square, a circle (an ellipse) and a triangle pointing up,
  each fitted to the region's bounding box, that overlaps the region best (intersection over
  union). The verdict also gives the largest region's fill ratio (area / bounding box:
  triangle 0.5, circle 0.79, square 1.0).
- The position is the named place (renderfarm.shapes.POSITIONS) nearest the shapes' centroid.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from renderfarm import shapes

NAMES = list(shapes.COLORS)
PALETTE = np.array([shapes.COLORS[n] for n in NAMES], dtype=np.float32)
MAX_DISTANCE = 110.0  # RGB distance past which a pixel is no colour of the world
MIN_AREA = 12
BORDER = 3


@dataclass(frozen=True)
class Verdict:
    background: str
    color: str | None  # None: no shape found
    shape: str | None
    count: int
    position: str | None
    fill: float  # fill ratio of the largest region (0 when there is none)


def judge(image: Image.Image) -> Verdict:
    """What ``image`` shows, by pixel statistics. Pictures not 64x64 are resized first."""
    image = image.convert("RGB")
    if image.size != (shapes.SIZE, shapes.SIZE):
        image = image.resize((shapes.SIZE, shapes.SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)
    labels = distance.argmin(axis=-1)
    labels[distance.min(axis=-1) > MAX_DISTANCE] = -1
    frame = np.ones_like(labels, dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border = labels[frame]
    border = border[border >= 0]
    background = Counter(border.tolist()).most_common(1)[0][0] if border.size else 0
    regions = [r for r in _regions((labels != background) & (labels >= 0)) if len(r[0]) >= MIN_AREA]
    if not regions:
        return Verdict(NAMES[background], None, None, 0, None, 0.0)
    ys = np.concatenate([r[0] for r in regions])
    xs = np.concatenate([r[1] for r in regions])
    color = Counter(labels[ys, xs].tolist()).most_common(1)[0][0]
    kinds = Counter(_shape_of(*r) for r in regions)
    largest = max(regions, key=lambda r: len(r[0]))
    cx, cy = (xs.mean() + 0.5) / shapes.SIZE, (ys.mean() + 0.5) / shapes.SIZE
    position = min(
        shapes.POSITIONS,
        key=lambda p: (shapes.POSITIONS[p][0] - cx) ** 2 + (shapes.POSITIONS[p][1] - cy) ** 2,
    )
    return Verdict(NAMES[background], NAMES[color], kinds.most_common(1)[0][0], len(regions),
                   position, _fill(*largest))


def check(scene: shapes.Scene, verdict: Verdict) -> dict[str, bool]:
    """Which parts of ``scene`` the verdict got right (position only where the scene names one)."""
    result = {
        "color": verdict.color == scene.color,
        "background": verdict.background == scene.background,
        "shape": verdict.shape == scene.shape,
        "count": verdict.count == scene.count,
    }
    if scene.position is not None:
        result["position"] = verdict.position == scene.position
    return result


def _fill(ys: np.ndarray, xs: np.ndarray) -> float:
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(len(ys) / box)


def _shape_of(ys: np.ndarray, xs: np.ndarray) -> str:
    """The shape whose outline, fitted to the region's bounding box, overlaps it best (IoU)."""
    y0, x0 = ys.min(), xs.min()
    height, width = ys.max() - y0 + 1, xs.max() - x0 + 1
    region = np.zeros((height, width), dtype=bool)
    region[ys - y0, xs - x0] = True
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    cx = width / 2
    templates = {
        "square": np.ones_like(region),
        "circle": ((xx - cx) / cx) ** 2 + ((yy - height / 2) / (height / 2)) ** 2 <= 1.0,
        "triangle": np.abs(xx - cx) <= cx * yy / height,  # pointing up, as drawn
    }

    def iou(template: np.ndarray) -> float:
        return (region & template).sum() / (region | template).sum()

    return max(templates, key=lambda name: iou(templates[name]))


def _regions(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Connected regions (4-neighbours) of ``mask``, each as (rows, columns)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    regions = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, ys, xs = [(y0, x0)], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append((np.array(ys), np.array(xs)))
    return regions
