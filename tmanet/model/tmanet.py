"""TMANet: ResNetV1c backbone + temporal memory attention head, with the reference inference paths."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..memory import MemoryStepper
from ..presets import ModelConfig
from .resnet import ResNetV1c
from .slide import pair, slide_windows
from .tma_head import FCNHead, TMAHead


@dataclass
class FrameResult:
    """One segmented frame: ``mask`` (H, W) uint8 class ids, ``logits`` (C, H, W) float32 or None."""
    index: int
    mask: np.ndarray
    logits: np.ndarray | None = None


def check_clip(frames, min_frames=1) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB clip (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"the clip has {frames.shape[0]} frames, at least {min_frames} are needed")
    return frames


class TMANet(nn.Module):
    def __init__(self, config: ModelConfig, with_aux: bool = False):
        super().__init__()
        self.config = config
        c = config
        self.backbone = ResNetV1c(c.depth, c.base_channels, c.output_stride)
        self.decode_head = TMAHead(c.in_channels, c.memory_frames, c.key_channels, c.value_channels, c.channels,
                                   c.num_classes, c.aggregation, c.dropout, place_read=c.place_read)
        self.auxiliary_head = (FCNHead(c.aux_in_channels, c.aux_channels, c.num_classes, c.dropout)
                               if with_aux else None)
        self.register_buffer("mean", torch.tensor(c.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- building blocks ---------------------------------------------------------------------------------
    def normalize(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]``, the official mean/std."""
        x = frames_u8.float().movedim(-1, -3)
        return (x - self.mean) / self.std

    def resize(self, logits, size):
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.config.align_corners)

    def forward(self, image: torch.Tensor, memory: torch.Tensor):
        """The official protocol (training and its comparison benchmark): the backbone runs on the current
        frame and on each of the T memory frames. ``image`` [B,3,H,W] and ``memory`` [B,T,3,H,W] (oldest first)
        are normalised. Returns logits at input size, and the auxiliary logits when the aux head exists."""
        size = image.shape[-2:]
        c3, feat = self.backbone(image)
        memory_feats = [self.backbone(memory[:, i])[1] for i in range(memory.shape[1])]
        logits = self.resize(self.decode_head(feat, memory_feats), size)
        if self.auxiliary_head is None:
            return logits
        return logits, self.resize(self.auxiliary_head(c3), size)

    # -- reference inference -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_clip(self, frames, mode: str = "whole", crop=None, stride=None) -> np.ndarray:
        """Logits ``(F-T, C, H, W)`` float32 for frames T..F-1 of a uint8 RGB clip ``(F, H, W, 3)``, memory
        ``[t-T .. t-1]`` (oldest first): the official test protocol, with the backbone run once per frame
        (per window in slide mode) instead of 1+T times. Slide mode uses the official windows and merge
        (sum of window logits / per-pixel count); crop and stride default to the preset's."""
        cfg = self.config
        T = cfg.memory_frames
        frames = check_clip(frames, T + 1)
        num, H, W, _ = frames.shape
        windows = self._windows(mode, H, W, crop, stride)
        out = np.zeros((num - T, cfg.num_classes, H, W), np.float32)
        count = np.zeros((H, W), np.float32)
        clip = torch.from_numpy(frames)
        for y1, y2, x1, x2 in windows:
            feats = []
            for t in range(num):
                feats.append(self.backbone(self.normalize(clip[t:t + 1, y1:y2, x1:x2]))[1])
                if t < T:
                    continue
                memory = feats[t - T:t]  # oldest first: slot i <- frame t-T+i
                logits = self.resize(self.decode_head(feats[t], memory), (y2 - y1, x2 - x1))
                out[t - T, :, y1:y2, x1:x2] += logits[0].numpy()
                feats[t - T] = None  # no longer needed
            count[y1:y2, x1:x2] += 1
        return out / count if len(windows) > 1 else out

    def _windows(self, mode, H, W, crop, stride):
        if mode == "whole":
            return [(0, H, 0, W)]
        if mode == "slide":
            return slide_windows(H, W, pair(crop or self.config.slide_crop), pair(stride or self.config.slide_stride))
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")

    def split(self, out_size, query_chunk=None):
        """The two deployment graphs, BatchNorm folded: (FrameEncoder, MemoryHead)."""
        from .split import FrameEncoder, MemoryHead
        return FrameEncoder(self), MemoryHead(self, out_size, query_chunk=query_chunk)

    @torch.inference_mode()
    def stream(self, frames, return_logits: bool = True) -> Iterator[FrameResult]:
        """Per-frame results from frame 0 on, through the FrameEncoder/MemoryHead split and a ring buffer of
        slot encodings; memory frame indices clamp to the first frame (the warm-up rule). From frame T on
        the result equals :meth:`predict_clip`."""
        frames = check_clip(frames)
        encoder, head = self.split(frames.shape[1:3])
        stepper = MemoryStepper(encoder, lambda qk, qv, keys, values: head(qk, qv, *keys, *values))
        for t, frame in enumerate(frames):
            mask, logits = stepper.step(torch.from_numpy(frame[None]))
            yield FrameResult(t, mask[0].numpy(), logits[0].numpy() if return_logits else None)
