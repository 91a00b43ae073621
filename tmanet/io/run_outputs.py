"""What ``tmanet run`` writes for each segmented frame: a video of pictures (``tmanet.pictures``), the logits as one ``.npy``, mask PNGs
(each optional). Each appears under its name only when closed (the mask PNGs as one folder, swapped in whole),
so a failed run leaves every earlier output as it was and an interrupted one leaves complete outputs."""
from __future__ import annotations

import re
from pathlib import Path

from tmanet.errors import UserError
from tmanet.safe_files import PendingDirectory
from tmanet.pictures import render
from tmanet.io.video import NpyWriter, VideoWriter, save_mask_png

MASK_NAME = re.compile(r"\d{6}\.png")


def check_mask_folder(path, overwrite: bool) -> None:
    """``--save-masks`` replaces its folder as a whole: it may be new or empty, or, with ``overwrite``, hold an
    earlier run's masks and nothing else (a folder with other files is never replaced)."""
    path = Path(path)
    if not path.is_dir():
        return
    names = [p.name for p in path.iterdir()]
    others = [n for n in names if not MASK_NAME.fullmatch(n)]
    if others:
        raise UserError(f"--save-masks {path} holds other files than mask PNGs (e.g. {sorted(others)[0]}): "
                        "refusing to replace it; choose a new or empty folder")
    if names and not overwrite:
        raise UserError(f"--save-masks {path} holds {len(names)} masks of an earlier run: add --overwrite to "
                        "replace them (the new set replaces the whole folder), or choose another folder")


class RunOutputs:
    """``render`` may run in any thread (it needs no order); ``write`` must be called in frame order, from one
    thread; then ``close()`` (keep) or ``discard()`` (remove the video and logits)."""

    def __init__(self, output, save_logits, save_masks, palette, class_names, alpha: float, fps: float,
                 layout: str = "overlay"):
        self.paths = [(what, where) for what, where in (("overlay", output), ("masks", save_masks),
                                                        ("logits", save_logits)) if where]
        self.palette, self.class_names, self.alpha, self.layout = palette, class_names, alpha, layout
        self.written = 0
        self._video = self._logits = self._masks = None
        try:
            self._masks = PendingDirectory(save_masks) if save_masks else None
            self._video = VideoWriter(output, fps=fps) if output else None
            self._logits = NpyWriter(save_logits) if save_logits else None
        except BaseException:
            self.discard()
            raise

    def render(self, index: int, frame, result):
        """Save frame ``index``'s mask PNG; return its picture for the video (None without a video)."""
        if self._masks is not None:
            save_mask_png(result.mask, self._masks.stage / f"{index:06d}.png", self.palette)
        if self._video is None:
            return None
        return render(frame, result.mask, self.palette, self.class_names, self.layout, self.alpha)

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
        if self._masks is not None:
            self._masks.commit()

    def discard(self) -> None:
        for sink in (self._video, self._logits, self._masks):
            if sink is not None:
                sink.discard()
