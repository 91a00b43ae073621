"""The pictures of a segmentation: class boundaries, a legend of the classes present, and one layout option."""
from __future__ import annotations

import numpy as np
import pytest

from tmanet.pictures import BOUNDARY_RGB, class_boundaries, legend, legend_width, overlay, render
from tmanet.presets import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE

H, W = 64, 96


def _mask():
    mask = np.full((H, W), 10, np.uint8)   # sky over
    mask[40:] = 0                          # road below
    mask[44:60, 10:30] = 13                # a car on the road
    return mask


def test_boundaries_are_one_pixel_lines_between_classes():
    edge = class_boundaries(_mask())
    assert edge[39].all() and not edge[38].any() and not edge[41, 40:].any()  # sky/road line at row 39 only
    assert edge[44:60, 29].all() and edge[43, 10:30].all()                      # the car's right and top sides
    assert not class_boundaries(np.zeros((H, W), np.uint8)).any()


def test_legend_names_the_classes_present_largest_first():
    panel = legend(_mask(), CITYSCAPES_PALETTE, CITYSCAPES_CLASSES, 100)
    assert panel.shape == (100, legend_width(CITYSCAPES_CLASSES), 3) and panel.shape[1] % 2 == 0
    # one swatch per class present, filled with its colour, in the order sky, road, car (by area)
    swatch_rows = [2 + r * 18 + 8 for r in range(3)]
    assert [tuple(panel[y, 8]) for y in swatch_rows] == [tuple(CITYSCAPES_PALETTE[c]) for c in (10, 0, 13)]
    assert tuple(panel[2 + 3 * 18 + 8, 8]) != tuple(CITYSCAPES_PALETTE[1])  # nothing below the three rows


def test_a_short_legend_counts_what_does_not_fit():
    mask = np.arange(H * W).reshape(H, W) % 19
    full = legend(mask.astype(np.uint8), CITYSCAPES_PALETTE, CITYSCAPES_CLASSES, 40)
    rows = (40 - 4) // 18
    assert tuple(full[2 + 8, 8]) in {tuple(c) for c in CITYSCAPES_PALETTE}
    assert tuple(full[2 + (rows - 1) * 18 + 8, 8]) not in {tuple(c) for c in CITYSCAPES_PALETTE}  # the "+N more" row


@pytest.mark.parametrize("layout,parts", [("overlay", 1), ("side-by-side", 2)])
def test_render_layouts(layout, parts):
    frame = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = _mask()
    picture = render(frame, mask, CITYSCAPES_PALETTE, CITYSCAPES_CLASSES, layout)
    assert picture.shape == (H, parts * W + legend_width(CITYSCAPES_CLASSES), 3)
    coloured = picture[:, (parts - 1) * W:parts * W]
    edge = class_boundaries(mask)
    assert (coloured[edge] == BOUNDARY_RGB).all()
    assert (coloured[~edge] == overlay(frame, mask, CITYSCAPES_PALETTE)[~edge]).all()
    if layout == "side-by-side":
        assert (picture[:, :W] == frame).all()
    with pytest.raises(ValueError, match="layout must be one of"):
        render(frame, mask, CITYSCAPES_PALETTE, CITYSCAPES_CLASSES, "mosaic")
