"""The official sliding-window rule (mmseg ``slide_inference``) as pure functions."""
from __future__ import annotations


def pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    h, w = v
    return int(h), int(w)


def slide_windows(height: int, width: int, crop, stride) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)``, row-major, exactly as the official code places them: a regular grid
    whose last row/column is shifted back to end at the border (windows overlap there). A crop larger than
    the image is clipped to the image."""
    hc, wc = pair(crop)
    hs, ws = pair(stride)
    if min(hc, wc, hs, ws) <= 0:
        raise ValueError(f"crop {crop} and stride {stride} must be positive")
    h_grids = max(height - hc + hs - 1, 0) // hs + 1
    w_grids = max(width - wc + ws - 1, 0) // ws + 1
    windows = []
    for gy in range(h_grids):
        for gx in range(w_grids):
            y2, x2 = min(gy * hs + hc, height), min(gx * ws + wc, width)
            windows.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
    return windows


def default_stride(input_size, slide_crop=None, slide_stride=None) -> tuple[int, int]:
    """Slide stride for crops of the export size: the preset's stride where the export size is the preset's
    crop (the official protocol), else the same overlap ratio (e.g. 513/769 of the crop), rounded. A crop or
    stride not recorded (None) is the export size: windows that do not overlap."""
    out = []
    for size, crop, stride in zip(input_size, pair(slide_crop or input_size), pair(slide_stride or input_size)):
        out.append(stride if size == crop else max(1, min(size, round(size * stride / crop))))
    return out[0], out[1]
