"""Procedural 32x32 scenes of the Shapes world, drawn with 4x supersampled anti-aliasing.

Geometry is shared with the judge: a shape is described by its kind, its centroid and its size ``s`` (the
diameter of a circle, the side of a square, the base and height of an upright isosceles triangle), and
:func:`coverage` gives the fraction of each pixel it covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewardflow.shapes.grammar import COLORS, PromptSpec

IMAGE_SIZE = 32
SUPERSAMPLE = 4
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (222, 52, 48),
    "green": (62, 192, 72),
    "blue": (58, 104, 238),
    "yellow": (236, 216, 52),
    "purple": (164, 72, 214),
    "white": (236, 236, 236),
}
BACKGROUND = (30.0, 30.0, 34.0)
SIZE_RANGE = (7.5, 11.0)
# Triangles are upright: the apex sits 2s/3 above the centroid and the base s/3 below it.
_AREA_FACTOR = {"circle": np.pi / 4.0, "square": 1.0, "triangle": 0.5}


def size_from_area(shape: str, area: float) -> float:
    """The size ``s`` of a shape of the given area in pixels."""
    return float(np.sqrt(area / _AREA_FACTOR[shape]))


def bounding_box(shape: str, cx: float, cy: float, s: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a shape in pixel units."""
    if shape == "triangle":
        return cx - s / 2, cy - 2 * s / 3, cx + s / 2, cy + s / 3
    return cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= (s / 2) ** 2
    if shape == "square":
        return (np.abs(dx) <= s / 2) & (np.abs(dy) <= s / 2)
    if shape == "triangle":
        top = -2 * s / 3
        return (dy >= top) & (dy <= s / 3) & (np.abs(dx) <= (dy - top) / 2)
    raise ValueError(f"shape {shape!r} is not one of circle, square, triangle")


def coverage(shape: str, cx: float, cy: float, s: float, window: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel in ``window`` = (row0, col0, rows, cols) that the shape covers, float32."""
    r0, c0, rows, cols = window
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = (r0 + np.arange(rows)[:, None] + sub[None, :]).reshape(-1)
    xs = (c0 + np.arange(cols)[:, None] + sub[None, :]).reshape(-1)
    hit = _inside(shape, xs[None, :], ys[:, None], cx, cy, s).astype(np.float32)
    return hit.reshape(rows, SUPERSAMPLE, cols, SUPERSAMPLE).mean(axis=(1, 3))


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: what it is and where (pixel units, x to the right, y down)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return bounding_box(self.shape, self.cx, self.cy, self.size)


def relation_holds(relation: str, a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether box ``a`` stands in ``relation`` to box ``b`` (GenEval's rule on box centres).

    The centre offset is shrunk on each axis by 10% of the two boxes' summed extents, then normalised by the
    unshrunk offset's length; a relation holds when its axis component exceeds 0.5.
    """
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    offset = ca - cb
    norm = float(np.linalg.norm(offset))
    if norm < 1e-6:
        return False
    shrunk = np.maximum(np.abs(offset) - 0.1 * dims, 0.0) * np.sign(offset) / norm
    dx, dy = float(shrunk[0]), float(shrunk[1])
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def _boxes_clear(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def layout(spec: PromptSpec, rng: np.random.Generator, max_tries: int = 400) -> list[PlacedObject]:
    """Place the objects a prompt asks for, without overlap, inside the image.

    Colours left free by the prompt are drawn uniformly from the palette, per object. Position prompts
    get a clear displacement along the relation's axis.
    """
    wanted = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    lo, hi = SIZE_RANGE
    if len(wanted) >= 3:
        hi = lo + (hi - lo) * (0.6 if len(wanted) == 3 else 0.35)
    for _ in range(max_tries):
        placed: list[PlacedObject] = []
        for shape, color in wanted:
            for _ in range(60):
                s = float(rng.uniform(lo, hi))
                cx = float(rng.uniform(1.0 + s / 2, IMAGE_SIZE - 1.0 - s / 2))
                cy = float(rng.uniform(1.0 + 2 * s / 3, IMAGE_SIZE - 1.0 - 2 * s / 3))
                obj = PlacedObject(shape, color or COLORS[int(rng.integers(len(COLORS)))], cx, cy, s)
                if all(_boxes_clear(obj.box, p.box, 2.0) for p in placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) != len(wanted):
            continue
        if spec.relation is not None and not _clear_relation(spec.relation, placed[0], placed[1]):
            continue
        return placed
    raise RuntimeError(f"could not lay out {spec.text!r} in {max_tries} tries")


def _clear_relation(relation: str, a: PlacedObject, b: PlacedObject) -> bool:
    axis = 0 if relation in ("left of", "right of") else 1
    main = abs((a.cx, a.cy)[axis] - (b.cx, b.cy)[axis])
    other = abs((a.cx, a.cy)[1 - axis] - (b.cx, b.cy)[1 - axis])
    return main >= 9.0 and other <= 0.5 * main and relation_holds(relation, a.box, b.box)


def draw(objects: list[PlacedObject], rng: np.random.Generator) -> np.ndarray:
    """Draw objects on a jittered dark background; returns uint8 [32, 32, 3]."""
    bg = np.array(BACKGROUND) + rng.uniform(-6, 6, size=3)
    img = np.broadcast_to(bg, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32).copy()
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        r0, c0 = max(int(np.floor(y0)) - 1, 0), max(int(np.floor(x0)) - 1, 0)
        r1, c1 = min(int(np.ceil(y1)) + 1, IMAGE_SIZE), min(int(np.ceil(x1)) + 1, IMAGE_SIZE)
        alpha = coverage(obj.shape, obj.cx, obj.cy, obj.size, (r0, c0, r1 - r0, c1 - c0))[..., None]
        color = np.array(PALETTE[obj.color], dtype=np.float32) + rng.uniform(-6, 6, size=3).astype(np.float32)
        img[r0:r1, c0:c1] = img[r0:r1, c0:c1] * (1 - alpha) + color * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(spec: PromptSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[PlacedObject]]:
    """A ground-truth scene for a prompt: uint8 image [32, 32, 3] and the objects drawn."""
    objects = layout(spec, rng)
    return draw(objects, rng), objects
