"""The standard test clip: smooth noise that moves by a fixed shift per frame (deterministic per seed),
used by the tests, the export check, benchmarks and ``python -m tmanet.synthetic_weights --make-clip``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_SHIFT = (2, 3)  # (dy, dx) pixels per frame: consecutive frames are the same texture, moved


def make_noise_clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 RGB ``(frames, height, width, 3)``: two octaves of smooth noise (cells of 16 and 4 px) mixed
    0.7/0.3 and stretched to 0..255; frame t is the window at offset (2t, 3t) of one canvas."""
    if min(frames, height, width) < 1:
        raise ValueError(f"frames, height and width must be >= 1, got {frames}, {height}, {width}")
    dy, dx = CLIP_SHIFT
    ch, cw = height + dy * (frames - 1), width + dx * (frames - 1)
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand((1, 3, ch // 16 + 2, cw // 16 + 2), generator=g)
    fine = torch.rand((1, 3, ch // 4 + 2, cw // 4 + 2), generator=g)
    canvas = (0.7 * F.interpolate(coarse, size=(ch, cw), mode="bilinear", align_corners=True)
              + 0.3 * F.interpolate(fine, size=(ch, cw), mode="bilinear", align_corners=True))
    canvas = (canvas - canvas.min()) / (canvas.max() - canvas.min())
    canvas = (canvas * 255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)  # CH, CW, 3
    # C-contiguous like a decoded video (stacking the permuted canvas's windows keeps their channel-first
    # strides, which would make every runtime push pay a strided copy of the frame).
    return np.ascontiguousarray(np.stack([canvas[t * dy:t * dy + height, t * dx:t * dx + width].numpy()
                                          for t in range(frames)]))
