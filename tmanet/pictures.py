"""Pictures of a segmentation that explain themselves: the class colours over the frame, thin class boundaries
(a class whose colour matches the scene, such as building grey or sky blue, still reads), and a legend naming
the classes present with their colours. ``tmanet run --output`` and the demo draw frames the same way, in one
of :data:`LAYOUTS`."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

LAYOUTS = ("overlay", "side-by-side")
BOUNDARY_RGB = (255, 255, 255)
_LEGEND_BG = (24, 24, 24)
_TEXT_RGB = (235, 235, 235)
_FONT_PX = 13
_ROW_PX = 18


def colorize(mask: np.ndarray, palette) -> np.ndarray:
    """Class ids ``(H, W)`` -> RGB ``(H, W, 3)`` uint8; ids beyond the palette are black."""
    lut = np.zeros((256, 3), np.uint8)
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    lut[:len(pal)] = pal
    return lut[mask]


def overlay(frame: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """The palette colours of ``mask`` blended over ``frame`` (``alpha`` = weight of the colours), rounded.
    Fixed point in 1/256 steps of alpha: in uint16 it is several times faster than float32 at 1024x2048."""
    a = int(round(float(alpha) * 256))
    out = frame.astype(np.uint16)
    out *= 256 - a
    colour = colorize(mask, palette).astype(np.uint16)
    colour *= a
    out += colour
    out += 128
    out >>= 8
    return out.astype(np.uint8)


def class_boundaries(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels whose right or lower neighbour has another class (one-pixel lines)."""
    edge = np.zeros(mask.shape, bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return edge


@lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def legend_width(class_names) -> int:
    """Width of the legend panel that fits every class name (fixed for a whole video), even for video codecs."""
    font = _font(_FONT_PX)
    longest = max((font.getlength(n) for n in class_names), default=0)
    return (int(longest + 3 * _ROW_PX) + 1) & ~1


def legend(mask: np.ndarray, palette, class_names, height: int, width: int | None = None) -> np.ndarray:
    """A ``(height, width, 3)`` panel listing the classes present in ``mask``, largest area first: a colour
    swatch and the name per row; classes that do not fit are counted in a last row."""
    from PIL import Image, ImageDraw
    width = width or legend_width(class_names)
    panel = Image.new("RGB", (width, height), _LEGEND_BG)
    draw = ImageDraw.Draw(panel)
    font = _font(_FONT_PX)
    counts = np.bincount(mask.ravel(), minlength=len(class_names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    rows = max(1, (height - 4) // _ROW_PX)
    shown = present if len(present) <= rows else present[:rows - 1]
    for row, c in enumerate(shown):
        y = 2 + row * _ROW_PX
        colour = tuple(int(v) for v in palette[c]) if c < len(palette) else (0, 0, 0)
        draw.rectangle([4, y + 2, 4 + _ROW_PX - 6, y + _ROW_PX - 4], fill=colour, outline=BOUNDARY_RGB)
        name = class_names[c] if c < len(class_names) else f"class {c}"
        draw.text((_ROW_PX + 4, y + 2), name, fill=_TEXT_RGB, font=font)
    if len(shown) < len(present):
        draw.text((4, 2 + len(shown) * _ROW_PX + 2), f"+{len(present) - len(shown)} more", fill=_TEXT_RGB,
                  font=font)
    return np.asarray(panel)


def render(frame: np.ndarray, mask: np.ndarray, palette, class_names, layout: str = "overlay",
           alpha: float = 0.5) -> np.ndarray:
    """One picture of a segmented frame: the colours over the frame with class boundaries, and the legend on
    the right; ``side-by-side`` puts the untouched frame first. Same size for every frame of a video."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    coloured = overlay(frame, mask, palette, alpha)
    coloured[class_boundaries(mask)] = BOUNDARY_RGB
    parts = ([frame] if layout == "side-by-side" else []) + [coloured, legend(mask, palette, class_names,
                                                                               frame.shape[0])]
    return np.concatenate(parts, axis=1)
