"""What ``tmanet run`` writes for each segmented frame: an overlay video, the logits as one ``.npy``, mask PNGs
(each optional). The video and the logits appear under their names only when closed, so an interrupted or
failed run leaves no half-written file there; a mask PNG is a whole file as soon as it is written."""
from __future__ import annotations

from pathlib import Path

from tmanet.video_io import NpyWriter, VideoWriter, overlay, save_mask_png


class RunOutputs:
    """``render`` may run in any thread (it needs no order); ``write`` must be called in frame order, from one
    thread; then ``close()`` (keep) or ``discard()`` (remove the video and logits)."""

    def __init__(self, output, save_logits, save_masks, palette, alpha: float, fps: float):
        self.paths = [(what, where) for what, where in (("overlay", output), ("masks", save_masks),
                                                        ("logits", save_logits)) if where]
        self.palette, self.alpha = palette, alpha
        self.mask_dir = Path(save_masks) if save_masks else None  # created with its first PNG
        self.written = 0
        self._video = self._logits = None
        try:
            self._video = VideoWriter(output, fps=fps) if output else None
            self._logits = NpyWriter(save_logits) if save_logits else None
        except BaseException:
            self.discard()
            raise

    def render(self, index: int, frame, result):
        """Save frame ``index``'s mask PNG; return its overlay image (None without a video)."""
        if self.mask_dir is not None:
            save_mask_png(result.mask, self.mask_dir / f"{index:06d}.png", self.palette)
        return overlay(frame, result.mask, self.palette, self.alpha) if self._video is not None else None

    def write(self, image, result) -> None:
        """Append the next frame: its overlay ``image`` (from :meth:`render`) and its logits."""
        if self._video is not None:
            self._video.write(image)
        if self._logits is not None:
            self._logits.append(result.logits)
        self.written += 1

    def close(self) -> None:
        for sink in (self._video, self._logits):
            if sink is not None:
                sink.close()

    def discard(self) -> None:
        for sink in (self._video, self._logits):
            if sink is not None:
                sink.discard()
