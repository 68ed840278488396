"""A deterministic judge for Shapes-world images: detect shapes, colours and positions; score prompts.

Detection works on any 32x32 RGB image:

1. The background is the median colour of the dark pixels; an image without a dark majority has no objects.
2. Foreground = pixels whose brightest channel stands well above the background's; connected components
   (8-neighbourhood) are candidate objects.
3. For each component, the object colour is the median of its core pixels and each pixel's *soft coverage*
   is its projection on the line from background to that colour. Ideal circle / square / triangle coverage
   maps with the same area and centroid are fitted to it; the best one is kept if its relative residual is
   small, otherwise the component is a *blob*. Colour is the nearest palette colour; components that are
   faint, of a colour far from the palette, or of mixed colours are blobs too. Specks are ignored.

Scoring follows GenEval: counting wants the exact count; two-object prompts want both objects; colour
prompts want the colour bound to the right shape; position prompts compare box centres. ``clean`` is a
strict pass with nothing unrequested in the image (blobs included), the check that exposes reward hacking
by scattering extra shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rewardflow.shapes.grammar import SHAPES, PromptSpec
from rewardflow.shapes.render import IMAGE_SIZE, PALETTE, bounding_box, coverage, relation_holds, size_from_area

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)
_EIGHT = np.ones((3, 3), dtype=bool)

# Thresholds, in 0-255 units unless stated. Rendered objects have a contrast of ~180 over the background.
DARK_LEVEL = 90.0  # a pixel whose brightest channel is below this may be background
MIN_DARK_FRACTION = 0.3
FOREGROUND_CONTRAST = 60.0  # brightest-channel rise over the background that marks foreground
MIN_OBJECT_CONTRAST = 110.0  # a component's core must rise at least this much, or it is a faint blob
MAX_COLOR_DISTANCE = 70.0  # RGB distance from the nearest palette colour
MAX_MIXED_FRACTION = 0.25  # share of core pixels whose nearest palette colour differs from the component's
MIN_AREA = 10.0  # soft-coverage area (pixels) below which a component is a speck and ignored
SIZE_LIMITS = (5.0, 16.0)  # allowed fitted size s of a real object
MAX_RESIDUAL = 0.35  # sum |coverage - template| / area for the best shape
_SCALES = (0.94, 1.0, 1.06)


@dataclass(frozen=True)
class Detection:
    """One connected component. ``shape`` and ``color`` are None for a blob (no clean fit)."""

    shape: str | None
    color: str | None
    cx: float
    cy: float
    area: float
    residual: float

    @property
    def is_object(self) -> bool:
        return self.shape is not None and self.color is not None

    @property
    def box(self) -> tuple[float, float, float, float]:
        shape = self.shape or "square"
        return bounding_box(shape, self.cx, self.cy, size_from_area(shape, self.area))


@dataclass(frozen=True)
class Verdict:
    """The judge's view of one image under one prompt.

    Attributes:
        strict: GenEval-style pass.
        clean: strict pass and no unrequested object or blob.
        score: partial credit in [0, 1].
        extra: detections beyond what the prompt asks for (blobs included).
        detections: everything detected.
    """

    strict: bool
    clean: bool
    score: float
    extra: int
    detections: tuple[Detection, ...]


def to_uint8_hwc(images: np.ndarray) -> np.ndarray:
    """Accept [N,32,32,3] uint8, or float [N,3,32,32] / [N,32,32,3] in [0, 1]; return uint8 [N,32,32,3]."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must have 4 dimensions [N, H, W, 3] or [N, 3, H, W], got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"Shapes images must be {IMAGE_SIZE}x{IMAGE_SIZE} RGB, got shape {np.asarray(images).shape}")
    if arr.dtype == np.uint8:
        return arr
    if not np.all(np.isfinite(arr)):
        raise ValueError("images contain NaN or infinite values")
    return np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _fit_shape(alpha: np.ndarray, window: tuple[int, int, int, int], cx: float, cy: float, area: float):
    best_shape, best_res = None, np.inf
    for shape in SHAPES:
        base = size_from_area(shape, area)
        for scale in _SCALES:
            tmpl = coverage(shape, cx, cy, base * scale, window)
            res = float(np.abs(alpha - tmpl).sum() / area)
            if res < best_res:
                best_shape, best_res = shape, res
    return best_shape, best_res


def detect(image: np.ndarray) -> list[Detection]:
    """Detect objects in one uint8 image [32, 32, 3]."""
    img = image.astype(np.float32)
    maxc = img.max(axis=-1)
    dark = maxc < DARK_LEVEL
    if dark.mean() < MIN_DARK_FRACTION:
        return []
    bg = np.median(img[dark], axis=0)
    bg_max = float(bg.max())
    labels, n = ndimage.label(maxc - bg_max > FOREGROUND_CONTRAST, structure=_EIGHT)
    detections = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == k
        rise = maxc[sl][comp] - bg_max
        core = comp & (maxc[sl] - bg_max >= 0.75 * np.percentile(rise, 90))
        core_rgb = img[sl][core]
        color_rgb = np.median(core_rgb, axis=0)
        # Soft coverage over the component grown by one pixel (not into other components).
        r0, c0 = max(sl[0].start - 2, 0), max(sl[1].start - 2, 0)
        r1, c1 = min(sl[0].stop + 2, IMAGE_SIZE), min(sl[1].stop + 2, IMAGE_SIZE)
        region = ndimage.binary_dilation(labels[r0:r1, c0:c1] == k, structure=_EIGHT)
        region &= (labels[r0:r1, c0:c1] == 0) | (labels[r0:r1, c0:c1] == k)
        direction = color_rgb - bg
        denom = float(direction @ direction)
        alpha = np.zeros(region.shape, dtype=np.float32)
        if denom > 0:
            proj = ((img[r0:r1, c0:c1] - bg) @ direction) / denom
            alpha = np.where(region, np.clip(proj, 0.0, 1.0), 0.0).astype(np.float32)
        area = float(alpha.sum())
        if area < MIN_AREA:
            continue  # a speck: not an object, not a blob
        rows, cols = np.mgrid[r0:r1, c0:c1]
        cy = float((alpha * (rows + 0.5)).sum() / area)
        cx = float((alpha * (cols + 0.5)).sum() / area)
        shape, residual = _fit_shape(alpha, (r0, c0, r1 - r0, c1 - c0), cx, cy, area)
        size = size_from_area(shape, area) if shape else 0.0
        dist = np.linalg.norm(_PALETTE_RGB - color_rgb, axis=1)
        nearest = int(dist.argmin())
        pixel_nearest = np.linalg.norm(core_rgb[:, None, :] - _PALETTE_RGB[None], axis=-1).argmin(axis=1)
        mixed = float((pixel_nearest != nearest).mean())
        good_color = (
            float(color_rgb.max()) - bg_max >= MIN_OBJECT_CONTRAST
            and dist[nearest] <= MAX_COLOR_DISTANCE
            and mixed <= MAX_MIXED_FRACTION
        )
        good_shape = residual <= MAX_RESIDUAL and SIZE_LIMITS[0] <= size <= SIZE_LIMITS[1]
        detections.append(
            Detection(
                shape=shape if good_shape and good_color else None,
                color=_PALETTE_NAMES[nearest] if good_shape and good_color else None,
                cx=cx,
                cy=cy,
                area=area,
                residual=residual,
            )
        )
    return detections


def _phrase_score(count: int, exact: bool, matched: int, shape_only: int, has_color: bool) -> float:
    if exact:
        score = max(0.0, 1.0 - abs(matched - count) / count)
        if has_color:
            score = max(score, 0.5 * max(0.0, 1.0 - abs(shape_only - count) / count))
        return score
    if matched >= 1:
        return 1.0
    return 0.5 if has_color and shape_only >= 1 else 0.0


def judge(spec: PromptSpec, detections: list[Detection]) -> Verdict:
    """Score one image's detections against a parsed prompt (see the module docstring for the rules)."""
    objects = [d for d in detections if d.is_object]
    matches, scores, passed = [], [], True
    for phrase in spec.objects:
        same_shape = [d for d in objects if d.shape == phrase.shape]
        matched = [d for d in same_shape if phrase.color is None or d.color == phrase.color]
        matches.append(matched)
        ok = len(matched) == phrase.count if phrase.exact else len(matched) >= 1
        passed &= ok
        scores.append(
            _phrase_score(phrase.count, phrase.exact, len(matched), len(same_shape), phrase.color is not None)
        )
    if len(spec.objects) == 2:
        # Two phrases need two distinct objects ("a circle and a red circle" is not one red circle), and
        # for position prompts a pair that stands in the relation.
        pairs = [(a, b) for a in matches[0] for b in matches[1] if a is not b]
        passed &= bool(pairs)
        if spec.relation is not None:
            related = any(relation_holds(spec.relation, a.box, b.box) for a, b in pairs)
            passed &= related
            scores.append(1.0 if related else 0.0)
    extra = max(0, len(detections) - spec.expected_objects)
    return Verdict(
        strict=bool(passed),
        clean=bool(passed and extra == 0),
        score=float(np.mean(scores)),
        extra=extra,
        detections=tuple(detections),
    )


def judge_images(specs: list[PromptSpec], images: np.ndarray) -> list[Verdict]:
    """Judge a batch: one prompt spec per image (see :func:`to_uint8_hwc` for accepted image layouts)."""
    arr = to_uint8_hwc(images)
    if len(specs) != len(arr):
        raise ValueError(f"got {len(specs)} prompts for {len(arr)} images; they must match one to one")
    return [judge(spec, detect(img)) for spec, img in zip(specs, arr)]
