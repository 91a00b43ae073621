"""A ``tmanet run`` that fails leaves every existing output byte-identical and no new final file; mask folders
are replaced as a whole set, only with --overwrite; a stop request is honoured while the input blocks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tmanet.cli import main

from test_fault_injection import REPO, fails_cleanly

H, W = 64, 128


def test_a_run_without_frames_keeps_the_earlier_outputs(export_b1, small_clip, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(export_b1), "-i", str(_npy(tmp_path / "clip.npy", small_clip)), "--save-logits",
                 str(out / "keep.npy"), "--save-masks", str(out / "masks"), "--output", str(out / "o.mp4"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    empty = _npy(tmp_path / "empty.npy", small_clip[:0])
    fails_cleanly(["run", export_b1, "-i", empty, "--save-logits", out / "keep.npy", "--save-masks", out / "masks",
                   "--overwrite", "--output", out / "o.mp4", "--no-progress"], capsys, tmp_path, "empty.npy: no frames")
    assert np.load(out / "keep.npy").shape == (4, 19, H, W)


def test_masks_of_an_earlier_run_are_replaced_whole_and_only_with_overwrite(export_b1, small_clip, tmp_path, capsys):
    masks = tmp_path / "masks"
    long_clip = _npy(tmp_path / "long.npy", small_clip)
    short_clip = _npy(tmp_path / "short.npy", small_clip[:3])
    run = ["run", str(export_b1), "--save-masks", str(masks), "--no-progress", "-i"]
    assert main(run + [str(long_clip)]) == 0
    assert sorted(p.name for p in masks.iterdir()) == [f"{i:06d}.png" for i in range(4)]
    fails_cleanly(run + [short_clip], capsys, tmp_path, "holds 4 masks of an earlier run: add --overwrite")
    assert main(run + [str(short_clip), "--overwrite"]) == 0
    assert sorted(p.name for p in masks.iterdir()) == [f"{i:06d}.png" for i in range(3)]  # no stale 000003.png
    capsys.readouterr()
    (masks / "notes.txt").write_text("a user's file")
    fails_cleanly(run + [short_clip, "--overwrite"], capsys, tmp_path, "holds other files than mask PNGs")


def test_a_mask_folder_may_not_hold_the_input(export_b1, small_clip, tmp_path, capsys):
    clip = _npy(tmp_path / "in" / "clip.npy", small_clip)
    fails_cleanly(["run", export_b1, "-i", clip, "--save-masks", tmp_path / "in", "--no-progress"], capsys,
                  tmp_path, "contains the input")


def test_a_failing_run_leaves_an_earlier_mask_folder_as_it_was(export_b1, small_clip, tmp_path, capsys):
    masks = tmp_path / "masks"
    assert main(["run", str(export_b1), "-i", str(_npy(tmp_path / "clip.npy", small_clip)), "--save-masks",
                 str(masks), "--no-progress"]) == 0
    capsys.readouterr()
    wrong_size = _npy(tmp_path / "big.npy", np.zeros((2, 2 * H, 2 * W, 3), np.uint8))
    fails_cleanly(["run", export_b1, "-i", wrong_size, "--save-masks", masks, "--overwrite", "--no-progress"],
                  capsys, tmp_path, "frame 0 of")
    with Image.open(masks / "000003.png") as im:
        assert np.asarray(im).shape == (H, W)


def test_sigterm_ends_a_run_whose_input_blocks(export_b1, tmp_path):
    """A pipe that delivers the start of a video and then nothing: FFmpeg waits in C code for more bytes,
    which no signal handler can interrupt; the command still ends on SIGTERM, with its status and one line."""
    fifo = tmp_path / "drive.mp4"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tmanet", "run", str(export_b1), "-i", str(fifo),
                             "--save-logits", str(tmp_path / "l.npy"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    writer = os.open(fifo, os.O_WRONLY)  # returns once tmanet has opened the pipe: its handlers are installed
    try:
        os.write(writer, b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41")
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("tmanet run ignored SIGTERM while its input blocked")
    finally:
        os.close(writer)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == "tmanet run: interrupted (SIGTERM)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive.mp4"]


def _npy(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path
