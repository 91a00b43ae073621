"""Fault injection: hostile or mistaken input never destroys a user's file, never leaves a partial output, and
fails with exit status 2 and one line; kills leave every output absent or complete; one segmenter is safe to
share between threads; a damaged video, checkpoint or manifest is refused instead of giving wrong results."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tmanet.checkpoints import CheckpointError, load_model, save_checkpoint
from tmanet.cli import main
from tmanet.export import ExportCheckError, export_onnx
from tmanet.manifest import ManifestError, load_manifest
from tmanet.runtime import StreamingSegmenter
from tmanet.io.video import open_frames

H, W = 64, 128
REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) -> (bytes, mtime_ns); every folder -> None."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def fails_cleanly(argv, capsys, folder: Path, match: str) -> str:
    """Run the CLI; it must exit 2 with one line naming the problem and leave ``folder`` as it was."""
    before = snapshot(folder)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert snapshot(folder) == before  # inputs unchanged (bytes and mtime), no partial or empty output
    return err


# -- never overwrite an input ---------------------------------------------------------------------------------
def test_run_refuses_every_spelling_of_its_input(export_b1, small_clip, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.save("clip.npy", small_clip)
    os.link("clip.npy", "hard.npy")
    os.symlink("clip.npy", "soft.npy")
    for out in ("clip.npy", "./clip.npy", str(tmp_path / "sub" / ".." / "clip.npy"), "hard.npy", "soft.npy"):
        fails_cleanly(["run", export_b1, "-i", "clip.npy", "--save-logits", out], capsys, tmp_path,
                      "is the input clip.npy: refusing to overwrite it")
    from tmanet.io.video import VideoWriter
    with VideoWriter(tmp_path / "drive.mp4", fps=10) as video:
        for frame in small_clip:
            video.write(frame)
    fails_cleanly(["run", export_b1, "-i", "drive.mp4", "--output", "drive.mp4"], capsys, tmp_path, "is the input")
    fails_cleanly(["run", export_b1, "-i", tmp_path, "--save-masks", tmp_path], capsys, tmp_path, "is the input")


def test_output_paths_are_checked_before_any_work(export_b1, small_clip, tmp_path, capsys):
    np.save(tmp_path / "clip.npy", small_clip)
    (tmp_path / "notes.txt").write_text("a user's file")
    (tmp_path / "folder").mkdir()
    run = ["run", export_b1, "-i", tmp_path / "clip.npy"]
    cases = [
        (["--output", tmp_path / "notes.txt" / "o.mp4"], "is a file, not a folder"),
        (["--output", tmp_path / "folder"], "is an existing folder"),
        (["--output", tmp_path / "o.xyz"], "unknown video container .xyz"),
        (["--save-masks", tmp_path / "notes.txt"], "is an existing file, not a folder"),
        (["--save-masks", tmp_path / "notes.txt" / "masks"], "is a file, not a folder"),
        (["--save-logits", tmp_path / "l.txt"], "writes a .npy file"),
    ]
    for extra, match in cases:
        fails_cleanly(run + extra, capsys, tmp_path, match)


def test_other_commands_refuse_their_inputs(export_b1, small_clip, tmp_path, capsys):
    exp = tmp_path / "exp"
    shutil.copytree(export_b1, exp)
    np.save(tmp_path / "clip.npy", small_clip)
    (tmp_path / "notes.txt").write_text("a user's file")
    fails_cleanly(["bench", exp, "--json", exp / "manifest.json"], capsys, tmp_path,
                  f"is a file of the input folder {exp}")
    fails_cleanly(["bench", exp, "--plot", tmp_path / "notes.txt" / "p.png"], capsys, tmp_path,
                  "is a file, not a folder")
    fails_cleanly(["compare", exp, exp, "--frames", tmp_path / "clip.npy", "--json", tmp_path / "clip.npy"],
                  capsys, tmp_path, "is the input")
    fails_cleanly(["calibrate", exp, "--frames", tmp_path / "clip.npy", "--precision", "fp16", "--out", tmp_path],
                  capsys, tmp_path, "contains the input")
    fails_cleanly(["eval", exp, "--data", "synthetic:1", "--json", exp / "frame_encoder.onnx"], capsys, tmp_path,
                  "is a file of the input folder")
    fails_cleanly(["train", "--preset", "cityscapes-r18", "--data", "synthetic:1", "--init",
                   exp.parent / "notes.txt", "--out", tmp_path], capsys, tmp_path, "contains the input")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder(export_b1, small_clip, tmp_path, capsys):
    np.save(tmp_path / "clip.npy", small_clip)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        fails_cleanly(["run", export_b1, "-i", tmp_path / "clip.npy", "--output", locked / "o.mp4"], capsys,
                      tmp_path, "permission denied")
    finally:
        locked.chmod(0o755)


def test_early_error_leaves_no_output(export_b1, tmp_path, capsys):
    np.save(tmp_path / "big.npy", np.zeros((3, 2 * H, 2 * W, 3), np.uint8))
    fails_cleanly(["run", export_b1, "-i", tmp_path / "big.npy", "--output", tmp_path / "o.mp4", "--save-masks",
                   tmp_path / "masks", "--save-logits", tmp_path / "out" / "l.npy", "--no-progress"], capsys, tmp_path,
                  "frame 0 of")


def test_export_out_checks(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "tiny.pth"
    shutil.copyfile(tiny_ckpt, ckpt)
    (tmp_path / "file").write_text("a user's file")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "thesis.tex").write_text("months of work")
    export = ["export", ckpt, "--height", H, "--width", W, "--no-check", "--out"]
    fails_cleanly(export + [tmp_path / "file"], capsys, tmp_path, "is an existing file, not a folder")
    fails_cleanly(export + [tmp_path / "stuff"], capsys, tmp_path, "not an export directory: refusing")
    fails_cleanly(export + [tmp_path], capsys, tmp_path, f"contains the input {ckpt}")
    fails_cleanly(["export", ckpt, "--preset", "nosuch", "--height", H, "--width", W, "--out", tmp_path / "o"],
                  capsys, tmp_path, "unknown preset 'nosuch'")


def test_failed_reexport_keeps_the_old_export(make_tiny_model, export_b1, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(export_b1, out)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="check frames must be"):
        export_onnx(make_tiny_model(1), out, H, W, check_frames=np.zeros((3, 32, 32, 3), np.uint8))
    assert snapshot(tmp_path) == before
    export_onnx(make_tiny_model(1), out, H, W, check=False)  # a complete export replaces it, leaving nothing else
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]
    assert load_manifest(out).files != load_manifest(export_b1).files


# -- wrong results without an error ---------------------------------------------------------------------------
def test_shared_segmenter_two_threads(export_b1):
    from tmanet.test_clips import make_noise_clip
    clips = [make_noise_clip(12, H, W, seed=s) for s in (1, 2)]
    results = [[], []]
    start = threading.Barrier(2)
    with StreamingSegmenter.open(export_b1, return_logits=True) as seg:
        def worker(k):
            start.wait()
            for frame in clips[k]:
                results[k].append((frame, seg.push(frame)))
        threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    pushed = sorted((res.index, frame, res) for part in results for frame, res in part)
    assert [i for i, _, _ in pushed] == list(range(24))  # every push was one whole step of the stream
    with StreamingSegmenter.open(export_b1, return_logits=True) as serial:
        for _, frame, res in pushed:
            assert np.array_equal(res.mask, res.logits.argmax(0))
            again = serial.push(frame)  # the same frames in the same order, from one thread
            assert np.array_equal(res.mask, again.mask) and np.array_equal(res.logits, again.logits)


def test_closed_segmenter_says_so(export_b1, small_clip):
    seg = StreamingSegmenter.open(export_b1)
    seg.push(small_clip[0])
    seg.close()
    seg.close()
    for call in (lambda: seg.push(small_clip[1]), lambda: seg.reset()):
        with pytest.raises(RuntimeError, match="StreamingSegmenter is closed"):
            call()


def test_empty_frame(export_b1):
    with StreamingSegmenter.open(export_b1) as seg, pytest.raises(ValueError, match="empty frame: 0x0"):
        seg.push(np.zeros((0, 0, 3), np.uint8))


def test_non_finite_weights_are_refused(make_tiny_model, tmp_path, capsys):
    model = make_tiny_model(0)
    with torch.no_grad():
        model.state_dict()["decode_head.bottleneck.conv.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"non-finite weights in decode_head\.bottleneck\.conv\.weight "
                                              r"\(1 of \d+ values"):
        load_model(tmp_path / "nan.pth")
    fails_cleanly(["export", tmp_path / "nan.pth", "--height", H, "--width", W, "--out", tmp_path / "o"], capsys,
                  tmp_path, "non-finite weights in decode_head.bottleneck.conv.weight")


def test_non_finite_outputs_fail_the_export_check(make_tiny_model, tmp_path):
    model = make_tiny_model(0)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.mul_(1e38)  # finite weights whose logits overflow float32
    with pytest.raises(ExportCheckError, match="non-finite logits"):
        export_onnx(model, tmp_path / "o", H, W)
    assert list(tmp_path.iterdir()) == []


def _streamable_video(path: Path, frames, options=None):
    import av
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("suffix,options", [(".mkv", None), (".ts", None), (".mp4", {"movflags": "faststart"})])
def test_truncated_video(export_b1, tmp_path, capsys, suffix, options):
    full = tmp_path / f"full{suffix}"
    noise = np.random.default_rng(3).integers(0, 256, (24, H, W, 3), dtype=np.uint8)  # frames of similar size
    _streamable_video(full, noise, options)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:len(data) // 2])
    full.unlink()
    logits = tmp_path / "l.npy"
    err = fails_cleanly(["run", export_b1, "-i", cut, "--save-logits", logits, "--no-progress"], capsys, tmp_path,
                        "the video is truncated or damaged: it ends after frame")
    assert "(the last good one;" in err and "--allow-truncated" in err
    kept = len(list(open_frames(cut, allow_truncated=True)))
    assert 0 < kept < 24 and f"after frame {kept - 1} (the last good one; {kept} frames read)" in err
    assert main(["run", str(export_b1), "-i", str(cut), "--save-logits", str(logits), "--allow-truncated",
                 "--no-progress"]) == 0
    assert np.load(logits).shape == (kept, 19, H, W)


# -- the manifest is validated once, at load ------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    (lambda m: m.pop("files"), "files"),
    (lambda m: m["files"].pop("memory_head.onnx"), "files"),
    (lambda m: m.update(sequence_num="2"), "sequence_num"),
    (lambda m: m.update(sequence_num=0), "sequence_num"),
    (lambda m: m.update(num_classes=1000), "num_classes"),
    (lambda m: m.update(feature_size=[8, 0]), "feature_size"),
    (lambda m: m.update(feature_size=[8]), "feature_size"),
    (lambda m: m.update(key_channels=16.5), "key_channels"),
    (lambda m: m.update(input_size=None), "input_size"),
    (lambda m: m.update(batch=[1]), "batch"),
    (lambda m: m.update(precision={"frame_encoder": "fp8", "memory_head": "fp32"}), "precision"),
])
def test_bad_manifest_field_is_named(export_b1, small_clip, tmp_path, capsys, change, field):
    np.save(tmp_path / "clip.npy", small_clip)
    exp = tmp_path / "exp"
    shutil.copytree(export_b1, exp)
    manifest = json.loads((exp / "manifest.json").read_text())
    change(manifest)
    (exp / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=f"manifest.json: field '{field}' (must be|is missing)"):
        load_manifest(exp)
    fails_cleanly(["run", exp, "-i", tmp_path / "clip.npy"], capsys, tmp_path, f"field '{field}' ")


def test_manifest_that_is_not_an_object(export_b1, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(export_b1, exp)
    (exp / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must be a JSON object, got a list"):
        load_manifest(exp)


def edited_export(export_b1, tmp_path, change) -> Path:
    """A copy of ``export_b1`` with ``change(manifest)`` applied (its checksums stay valid)."""
    exp = tmp_path / "exp"
    shutil.copytree(export_b1, exp)
    manifest = json.loads((exp / "manifest.json").read_text())
    change(manifest)
    (exp / "manifest.json").write_text(json.dumps(manifest))
    return exp


@pytest.mark.parametrize("change,match", [
    # huge values are refused by their bound, before anything is sized by them (1e9 once grew the process to
    # ~24 GB, or raised ArrayMemoryError)
    (lambda m: m.update(sequence_num=10**9), "field 'sequence_num' must be at most 64"),
    (lambda m: m.update(key_channels=10**9), "field 'key_channels' must be at most 16384"),
    (lambda m: m.update(max_batch=10**9, batch=10**9), "field 'batch' must be at most 4096"),
    (lambda m: m.update(input_size=[10**6, 128]), "field 'input_size' must be a list of two integers in 1..16384"),
    # plausible values the graphs contradict (they once reached ONNX Runtime and failed there)
    (lambda m: m.update(sequence_num=3), "field 'sequence_num' is 3, but memory_head.onnx has 2 memory_key inputs"),
    (lambda m: m.update(feature_size=[8, 8]), "field 'feature_size' says 8, but frame_encoder.onnx's output "
                                              "query_key has the shape [1, 16, 8, 16]"),
    (lambda m: m.update(num_classes=5), "field 'num_classes' says 5, but memory_head.onnx's output logits has "
                                        "the shape [1, 19, 64, 128]"),
    (lambda m: m.update(key_channels=17), "field 'key_channels' says 17, but frame_encoder.onnx's output "
                                          "query_key has the shape [1, 16, 8, 16]"),
    (lambda m: m.update(value_channels=64), "field 'value_channels' says 64"),
    (lambda m: m.update(input_size=[64, 256]), "field 'input_size' says 256, but frame_encoder.onnx's input frames"),
    (lambda m: m.update(batch=2, max_batch=2), "field 'batch' says 2"),
], ids=["T-1e9", "Ck-1e9", "batch-1e9", "size-1e6", "T-3", "feature-8x8", "classes-5", "Ck-17", "Cv-64",
        "size-64x256", "batch-2"])
def test_manifest_values_are_bounded_and_checked_against_the_graphs(export_b1, small_clip, tmp_path, capsys,
                                                                    change, match):
    np.save(tmp_path / "clip.npy", small_clip)
    exp = edited_export(export_b1, tmp_path, change)
    with pytest.raises(ManifestError, match=re.escape(match)):
        load_manifest(exp)
    fails_cleanly(["run", exp, "-i", tmp_path / "clip.npy", "--save-logits", tmp_path / "l.npy", "--no-progress"],
                  capsys, tmp_path, match)


@pytest.mark.parametrize("damage", ["truncated", "not onnx"])
def test_unparsable_graph_with_a_matching_checksum_is_one_line(export_b1, small_clip, tmp_path, capsys, damage):
    from tmanet.export.manifest import file_entries
    np.save(tmp_path / "clip.npy", small_clip)
    exp = tmp_path / "exp"
    shutil.copytree(export_b1, exp)
    graph = exp / "memory_head.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x08" + b"\xff" * 64)
    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["files"].update(file_entries(exp, ["memory_head.onnx"]))  # the SHA256 updated: only the parse fails
    (exp / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="memory_head.onnx: not a readable ONNX graph"):
        load_manifest(exp)
    fails_cleanly(["run", exp, "-i", tmp_path / "clip.npy", "--no-progress"], capsys, tmp_path,
                  "memory_head.onnx: not a readable ONNX graph")


def test_a_ring_larger_than_the_memory_is_refused_before_allocating(export_b1, small_clip, tmp_path, capsys,
                                                                   monkeypatch):
    import tmanet.memory as memory
    # the tiny export's ring per stream: 3 positions x 2 slots x (16 + 32 channels) x 8 x 16 x 4 bytes
    per_stream = 3 * 2 * (16 + 32) * 8 * 16 * 4
    monkeypatch.setattr(memory, "available_bytes", lambda probe: 3 * per_stream)  # a machine with room for 3
    allocated = []
    seg = StreamingSegmenter.open(export_b1)
    real_zeros = seg.backend.zeros
    monkeypatch.setattr(seg.backend, "zeros", lambda shape: allocated.append(shape) or real_zeros(shape))
    with pytest.raises(memory.RingTooLarge, match=f"the memory ring needs .* \\(4 rows x 3 positions x 2 slots, "
                                                  "keys \\[16, 8, 16\\], values \\[32, 8, 16\\]\\) but only"):
        seg.push_batch(np.stack([small_clip[0]] * 4))
    assert all(math.prod(s) == 0 for s in allocated)  # nothing but the zero-size probe was allocated
    assert len(seg.push_batch(np.stack([small_clip[0]] * 3))) == 3  # 3 streams fit, and the refusal changed nothing
    with pytest.raises(memory.RingTooLarge):
        seg.add_stream()
    assert seg.streams == 3 and len(seg.push_batch(np.stack([small_clip[1]] * 3))) == 3
    seg.close()
    monkeypatch.setattr(memory, "available_bytes", lambda probe: per_stream // 2)
    np.save(tmp_path / "clip.npy", small_clip)
    fails_cleanly(["run", export_b1, "-i", tmp_path / "clip.npy", "--save-logits", tmp_path / "l.npy",
                   "--no-progress"], capsys, tmp_path, "the memory ring needs")


# -- one-line errors instead of tracebacks --------------------------------------------------------------------
def test_bad_image_folders_name_the_file(export_b1, small_clip, tmp_path, capsys):
    from PIL import Image
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(small_clip):
        Image.fromarray(frame).save(frames / f"{i:02d}.png")
    Image.fromarray(small_clip[0][:32]).save(frames / "02.png")
    fails_cleanly(["run", export_b1, "-i", frames, "--save-logits", tmp_path / "l.npy", "--no-progress"], capsys,
                  tmp_path, "02.png: 128x32 image in a folder of 128x64 frames")
    (frames / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fails_cleanly(["run", export_b1, "-i", frames, "--save-logits", tmp_path / "l.npy", "--no-progress"], capsys,
                  tmp_path, "02.png: not a readable image")
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00")
    fails_cleanly(["run", export_b1, "-i", tmp_path / "cut.npy"], capsys, tmp_path, "cut.npy: not a readable .npy")


def test_pickle_with_code_is_refused_not_called_truncated(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should never run",))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=4))
    with pytest.raises(CheckpointError, match=r"refused to load .*plain pickle that imports Python objects "
                                              r"\((posix|nt)\.system\)"):
        load_model(tmp_path / "evil.pth")


def test_missing_key_is_named_not_blamed_on_others(official_cityscapes_ckpt, tmp_path):
    obj = torch.load(official_cityscapes_ckpt, weights_only=True)
    del obj["state_dict"]["backbone.layer1.0.conv3.weight"]  # without it the shapes would say ResNet-34
    torch.save(obj, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "missing.pth")
    assert "1 missing keys:\n    backbone.layer1.0.conv3.weight" in str(e.value)
    assert "unexpected" not in str(e.value) and "mis-shaped" not in str(e.value)


def test_negative_threads_are_refused(export_b1, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(export_b1), "-i", "x.npy", "--threads", "-1"])
    assert e.value.code == 2 and "must be >= 1, got -1" in capsys.readouterr().err


# -- kills: every output is absent or complete ----------------------------------------------------------------
def _tmanet(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tmanet", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, **kwargs)


def _wait_for(condition, proc, what, limit=180.0):
    """Poll (bounded) until ``condition()``; fail if the process ends first or the limit passes."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"tmanet ended (status {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A .npy clip long enough that a run is still going when the test kills it (a sparse file: cheap)."""
    path = tmp_path_factory.mktemp("long") / "long.npy"
    clip = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(20000, H, W, 3))
    from tmanet.test_clips import make_noise_clip
    clip[:4] = make_noise_clip(4, H, W, seed=5)
    clip.flush()
    del clip
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_complete_outputs_or_none(export_b1, long_clip, tmp_path, sig):
    logits, video, masks = tmp_path / "l.npy", tmp_path / "o.mp4", tmp_path / "masks"
    proc = _tmanet("run", export_b1, "-i", long_clip, "--save-logits", logits, "--output", video,
                   "--save-masks", masks, "--threads", 1, "--no-progress")
    # Killed once results are being written: the logits file holds its header and at least two frames.
    frame_bytes = 19 * H * W * 4
    _wait_for(lambda: any(p.stat().st_size >= 256 + 2 * frame_bytes for p in tmp_path.glob(".l.partial-*.npy")),
              proc, "logits written")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err
    pngs = sorted(p for p in masks.glob("*.png") if not p.name.startswith("."))
    for png in pngs:  # every mask under its final name is whole
        from PIL import Image
        with Image.open(png) as im:
            assert np.asarray(im).shape == (H, W)
    if sig == signal.SIGKILL:
        assert not logits.exists() and not video.exists()
        return
    written = int(out.split("interrupted: ")[1].split(" frames written")[0])
    assert written >= 2 and "interrupted (SIGTERM)" in err
    assert np.load(logits).shape == (written, 19, H, W) and np.isfinite(np.load(logits)).all()
    assert len(list(open_frames(video))) == written and len(pngs) == written
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_reexport_keeps_the_previous_export(export_b1, tiny_ckpt, tmp_path, sig):
    out = tmp_path / "exp"
    shutil.copytree(export_b1, out)
    before = snapshot(out)
    proc = _tmanet("export", tiny_ckpt, "--height", H, "--width", W, "--out", out)
    _wait_for(lambda: any(tmp_path.glob(".exp.partial-*/frame_encoder.onnx")), proc, "the staged export")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err
    assert snapshot(out) == before  # the previous export, untouched and still valid
    load_manifest(out)
    if sig == signal.SIGTERM:  # cleanup ran: nothing staged is left
        assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_python_dash_m_tmanet(tmp_path):
    proc = _tmanet("export", tmp_path / "missing.pth", "--height", H, "--width", W, "--out", tmp_path / "o")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip() == f"tmanet export: error: checkpoint not found: {tmp_path / 'missing.pth'}"


# -- a full disk -------------------------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs the test mounts (and unmounts) itself: writes past 1 MiB fail with ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("flag,name", [("--save-logits", "logits.npy"), ("--output", "overlay.mp4")])
def test_full_disk_during_run_is_one_line_and_keeps_older_outputs(export_b1, tmp_path, small_disk, capsys, flag,
                                                                  name):
    """The run's outputs do not fit in the 64 KiB left (48 frames of logits: 30 MB; an overlay of 48 frames
    of white noise: ~250 KB): one line, exit 2, no partial or temporary file, the older outputs byte-identical."""
    np.save(tmp_path / "clip.npy", np.random.default_rng(4).integers(0, 256, (48, H, W, 3), np.uint8))
    (small_disk / name).write_bytes(b"an older result " * 61440)  # 960 KiB of the 1 MiB
    (small_disk / "notes.txt").write_text("a user's file")
    before = snapshot(small_disk)
    code = main(["run", str(export_b1), "-i", str(tmp_path / "clip.npy"), flag, str(small_disk / name),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{small_disk / name}: cannot write it (No space left on device)" in err, err
    assert snapshot(small_disk) == before  # the older output intact, nothing partial or temporary left
