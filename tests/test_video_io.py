"""Frame sources (video, image folder, .npy), result sinks (overlay video, mask PNGs, logits .npy) and the
``tmanet run`` command end to end, on real files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tmanet.cli import main
from tmanet.pictures import colorize, legend_width, overlay, render
from tmanet.io.video import NpyWriter, VideoWriter, open_frames, save_mask_png
from tmanet.test_clips import make_noise_clip

H, W = 64, 128




def write_video(path, frames, fps=10):
    with VideoWriter(path, fps=fps) as w:
        for f in frames:
            w.write(f)
    return w


# -- sources -----------------------------------------------------------------------------------------------
def test_video_round_trip(tmp_path):
    clip = make_noise_clip(8, 64, 96, seed=3)
    w = write_video(tmp_path / "clip.mp4", clip, fps=10)
    assert w.frames == 8 and w.codec in ("libx264", "mpeg4")
    src = open_frames(tmp_path / "clip.mp4")
    assert src.kind == "video" and src.count == 8 and src.fps == pytest.approx(10)
    items = list(src)
    assert len(items) == 8
    for (frame, t), original, i in zip(items, clip, range(8)):
        assert frame.dtype == np.uint8 and frame.shape == (64, 96, 3)
        assert t == pytest.approx(i / 10)
        assert np.abs(frame.astype(int) - original).mean() < 12  # lossy, but the same picture
    # Frames are told apart: each decoded frame is closest to its own original.
    errors = [[np.abs(f.astype(int) - o).mean() for o in clip] for f, _ in items]
    assert [int(np.argmin(e)) for e in errors] == list(range(8))
    assert len(list(open_frames(tmp_path / "clip.mp4", max_frames=3))) == 3


def test_odd_frame_sizes_are_padded_to_even(tmp_path):
    clip = make_noise_clip(3, 63, 101, seed=4)
    write_video(tmp_path / "odd.mp4", clip)
    frames = [f for f, _ in open_frames(tmp_path / "odd.mp4")]
    assert frames[0].shape == (64, 102, 3)
    assert np.abs(frames[1][:63, :101].astype(int) - clip[1]).mean() < 12


def test_image_folder_sorted_by_name(tmp_path):
    clip = make_noise_clip(4, 32, 48, seed=5)
    names = ["frame_10.png", "frame_02.png", "frame_01.png", "frame_03.jpg"]  # written out of order
    for name, frame in zip(names, clip):
        Image.fromarray(frame).save(tmp_path / name, quality=95)
    (tmp_path / "notes.txt").write_text("not a frame")
    src = open_frames(tmp_path)
    assert src.kind == "images" and src.count == 4
    frames = [f for f, t in src]
    order = [2, 1, 3, 0]  # frame_01, frame_02, frame_03.jpg, frame_10
    for got, k in zip(frames, order):
        if names[k].endswith(".png"):
            assert np.array_equal(got, clip[k])  # PNG is lossless
        else:
            assert np.abs(got.astype(int) - clip[k]).mean() < 8
    Image.fromarray(clip[0][:16]).save(tmp_path / "frame_99.png")
    with pytest.raises(ValueError, match="one size"):
        list(open_frames(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no png/jpg/jpeg images"):
        open_frames(tmp_path / "empty")


def test_npy_source(tmp_path):
    clip = make_noise_clip(5, 32, 48, seed=6)
    np.save(tmp_path / "clip.npy", clip)
    src = open_frames(tmp_path / "clip.npy", max_frames=4)
    items = list(src)
    assert src.count == 4 and len(items) == 4
    assert all(t is None for _, t in items)
    assert np.array_equal(np.stack([f for f, _ in items]), clip[:4])
    np.save(tmp_path / "float.npy", clip.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB clip"):
        open_frames(tmp_path / "float.npy")
    Image.fromarray(clip[0]).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="single image"):
        open_frames(tmp_path / "one.png")
    with pytest.raises(FileNotFoundError):
        open_frames(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot read"):
        open_frames(tmp_path / "junk.mp4")


# -- sinks -------------------------------------------------------------------------------------------------
def test_npy_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((19, 8, 16)).astype(np.float32) for _ in range(5)]
    with NpyWriter(tmp_path / "logits.npy") as w:
        for a in arrays:
            w.append(a)
        with pytest.raises(ValueError, match="differs"):
            w.append(np.zeros((19, 8, 15), np.float32))
    back = np.load(tmp_path / "logits.npy")
    assert back.shape == (5, 19, 8, 16) and back.dtype == np.float32
    assert np.array_equal(back, np.stack(arrays))
    assert np.array_equal(np.load(tmp_path / "logits.npy", mmap_mode="r")[3], arrays[3])


def test_mask_png_keeps_class_ids_and_palette(tmp_path):
    mask = (np.arange(40 * 50).reshape(40, 50) % 19).astype(np.uint8)
    palette = [(i * 10, 255 - i * 10, i) for i in range(19)]
    save_mask_png(mask, tmp_path / "m.png", palette)
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P"
    assert np.array_equal(np.asarray(im), mask)
    assert np.array_equal(np.asarray(im.convert("RGB")), colorize(mask, palette))


def test_overlay_blend():
    frame = np.full((4, 6, 3), 100, np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1
    palette = [(0, 0, 0), (200, 50, 250)]
    assert np.array_equal(overlay(frame, mask, palette, alpha=0.0), frame)
    assert np.array_equal(overlay(frame, mask, palette, alpha=1.0), colorize(mask, palette))
    half = overlay(frame, mask, palette, alpha=0.5)
    assert half[0, 0].tolist() == [50, 50, 50] and half[0, 5].tolist() == [150, 75, 175]


# -- tmanet run --------------------------------------------------------------------------------------------
def test_run_command_writes_overlay_masks_and_logits(export_b1, tmp_path, capsys):
    from tmanet.runtime import StreamingSegmenter
    clip = make_noise_clip(5, H, W, seed=9)
    np.save(tmp_path / "clip.npy", clip)
    args = ["run", str(export_b1), "--input", str(tmp_path / "clip.npy"), "--output", str(tmp_path / "o.mp4"),
            "--save-masks", str(tmp_path / "masks"), "--save-logits", str(tmp_path / "logits.npy"),
            "--max-frames", "4", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 frames" in out and "ort" in out
    seg = StreamingSegmenter.open(export_b1, return_logits=True)
    expected = [seg.push(f) for f in clip[:4]]
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (4, 19, H, W)
    assert np.array_equal(logits, np.stack([r.logits for r in expected]))
    pngs = sorted((tmp_path / "masks").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(4)]
    for p, r in zip(pngs, expected):
        assert np.array_equal(np.asarray(Image.open(p)), r.mask)
    video = [f for f, _ in open_frames(tmp_path / "o.mp4")]
    assert len(video) == 4 and video[0].shape == (H, W + legend_width(seg.class_names), 3)  # + the legend
    pictured = render(clip[2], expected[2].mask, seg.palette, seg.class_names)
    assert np.abs(video[2].astype(int) - pictured).mean() < 12


def test_run_command_on_video_and_image_folder(export_b1, tmp_path):
    clip = make_noise_clip(4, H, W, seed=10)
    write_video(tmp_path / "in.mp4", clip)
    assert main(["run", str(export_b1), "-i", str(tmp_path / "in.mp4"), "--save-masks", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    (tmp_path / "frames").mkdir()
    for i, f in enumerate(clip):
        Image.fromarray(f).save(tmp_path / "frames" / f"{i:03d}.png")
    assert main(["run", str(export_b1), "-i", str(tmp_path / "frames"), "--save-masks", str(tmp_path / "b"),
                 "--backend", "torch", "--no-progress"]) == 0
    assert len(list((tmp_path / "a").glob("*.png"))) == len(list((tmp_path / "b").glob("*.png"))) == 4


def test_run_command_size_errors_and_slide(export_b1, tmp_path, capsys):
    big = make_noise_clip(3, 80, 160, seed=11)
    np.save(tmp_path / "big.npy", big)
    assert main(["run", str(export_b1), "-i", str(tmp_path / "big.npy"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "differs from the export size 64x128" in err and "--mode slide" in err
    np.save(tmp_path / "small.npy", make_noise_clip(2, 32, 64, seed=1))
    assert main(["run", str(export_b1), "-i", str(tmp_path / "small.npy"), "--mode", "slide",
                 "--no-progress"]) == 2
    assert "smaller than the export size" in capsys.readouterr().err
    assert main(["run", str(export_b1), "-i", str(tmp_path / "big.npy"), "--mode", "slide", "--stride", "16",
                 "32", "--save-logits", str(tmp_path / "l.npy"), "--no-progress"]) == 0
    assert np.load(tmp_path / "l.npy").shape == (3, 19, 80, 160)
    assert main(["run", str(tmp_path), "-i", str(tmp_path / "big.npy"), "--no-progress"]) == 2
    assert "not an export directory" in capsys.readouterr().err
