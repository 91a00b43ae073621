"""``tmanet batch`` on real Ray (an embedded local instance, and a `ray start --head` cluster on 127.0.0.1), real
ONNX Runtime, real videos (PyAV), image folders, ``.npy`` clips and MCAP files: chunked masks equal ``tmanet
run``'s byte for byte, done inputs are skipped, a bad input fails alone, a SIGKILLed worker's chunk is retried.

Every run compares with ``tmanet run --threads 1`` (a worker runs one ORT thread): the same thread count gives
the same floating-point sums."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from tmanet.cli import main  # noqa: E402
from tmanet.test_clips import make_noise_clip  # noqa: E402
from tmanet.io.video import open_frames, video_index  # noqa: E402

from test_mcap import CAMERAS, FRONT, MASKS, REAR, drive, read_mcap  # noqa: E402,F401  (drive: the two-camera MCAP fixture)

H, W = 64, 128
GAP_AFTER = 10  # the video's timestamps jump by 2.1 s after this frame: sequential processing resets there


def write_video(path, frames, gop: int, gap_after: int | None = None):
    """H.264 in MP4 with a keyframe every ``gop`` frames, 10 fps; after frame ``gap_after`` the timestamps
    jump by 2 s (a recording paused)."""
    import av
    from fractions import Fraction
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 10)
        stream.gop_size = gop
        stream.options = {"crf": "20", "preset": "veryfast", "bf": "2", "sc_threshold": "0"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i + (20 if gap_after is not None and i > gap_after else 0)
            frame.time_base = Fraction(1, 10)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three inputs of different lengths and kinds: a 19-frame video (keyframe every 5 frames, B-frames, a 2.1 s
    timestamp gap), a folder of 9 PNG frames and a 14-frame .npy clip."""
    from PIL import Image
    root = tmp_path_factory.mktemp("batch_inputs")
    video = write_video(root / "drive.mp4", make_noise_clip(19, H, W, seed=31), gop=5, gap_after=GAP_AFTER)
    folder = root / "frames"
    folder.mkdir()
    for i, frame in enumerate(make_noise_clip(9, H, W, seed=32)):
        Image.fromarray(frame).save(folder / f"f{i:03d}.png")
    clip = root / "clip.npy"
    np.save(clip, make_noise_clip(14, H, W, seed=33))
    return [video, folder, clip]


def run_masks(export, source, out: Path) -> Path:
    assert main(["run", str(export), "-i", str(source), "--save-masks", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(export_b1, clips, tmp_path_factory):
    """``tmanet run --save-masks`` of each clip."""
    root = tmp_path_factory.mktemp("batch_reference")
    return {c.name: run_masks(export_b1, c, root / c.name) for c in clips}


def batch(export, inputs, out, *flags) -> tuple[int, dict]:
    summary = Path(str(out) + ".json")
    code = main(["batch", str(export), *map(str, inputs), "--out", str(out), "--json", str(summary),
                 "--no-progress", *flags])
    return code, json.loads(summary.read_text())


def same_files(a: Path, b: Path) -> list[str]:
    """The names of the files of folder ``a``, after checking that folder ``b`` has the same, byte for byte."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def test_chunked_batch_equals_run_then_skips_and_a_bad_input_fails_alone(export_b1, clips, reference, tmp_path):
    video = clips[0]
    index = video_index(video)
    assert index.why_not_seekable(video) is None and len(index.keyframes) == 4  # entered by seeking
    times = [t for _, t in open_frames(video)]
    assert times[GAP_AFTER + 1] - times[GAP_AFTER] == pytest.approx(2.1)  # a reset inside chunk 3's warm-up

    out = tmp_path / "out"
    code, summary = batch(export_b1, clips, out, "--chunk-frames", "4", "--workers", "2")
    assert code == 0
    assert (summary["done"], summary["skipped"], summary["failed"], summary["frames"]) == (3, 0, [], 42)
    assert summary["whole"] == [] and summary["workers"] == 2
    for clip in clips:
        names = same_files(out / clip.name / "masks", reference[clip.name])
        done = json.loads((out / clip.name / "done.json").read_text())
        assert done["frames"] == len(names) and done["chunks"] == -(-len(names) // 4)
        assert done["size"] > 0 and len(done["manifest_sha256"]) == 64
    assert sorted(p.name for p in out.iterdir()) == sorted(c.name for c in clips)  # no staging folder left

    # The warm-up matters: frame 4 segmented cold (its chunk without the T frames before) is another mask.
    from PIL import Image

    from tmanet.runtime import StreamingSegmenter
    clip = np.load(clips[2])
    with StreamingSegmenter.open(export_b1, threads=1) as seg:
        cold = seg.push(clip[4]).mask
    assert not np.array_equal(cold, np.array(Image.open(out / "clip.npy" / "masks" / "000004.png")))

    bad = tmp_path / "bad.npy"
    np.save(bad, make_noise_clip(3, 48, 96, seed=1))  # not the export size, and no --resize
    stamps = {c.name: (out / c.name / "done.json").stat().st_mtime_ns for c in clips}
    code, summary = batch(export_b1, [*clips, bad], out, "--chunk-frames", "4", "--workers", "2")
    assert code == 1
    assert (summary["done"], summary["skipped"], summary["frames"]) == (0, 3, 0)
    assert [f["input"] for f in summary["failed"]] == [str(bad)]
    assert "frame size 48x96 differs from the export size 64x128" in summary["failed"][0]["error"]
    assert stamps == {c.name: (out / c.name / "done.json").stat().st_mtime_ns for c in clips}
    assert sorted(p.name for p in out.iterdir()) == sorted(c.name for c in clips)  # nothing for the bad one


def test_a_worker_killed_mid_chunk_is_retried_and_the_result_is_identical(export_b1, tmp_path, monkeypatch):
    """A worker SIGKILLs itself right after writing the first mask of a chunk (runtime.batch's fault hook, once
    per marker file): the chunk is retried on a new worker and the output equals `tmanet run`'s."""
    from tmanet.runtime.batch import KILL_ONCE_ENV
    clip = tmp_path / "long.npy"
    np.save(clip, make_noise_clip(24, H, W, seed=41))
    want = run_masks(export_b1, clip, tmp_path / "want")
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    code, summary = batch(export_b1, [clip], tmp_path / "out", "--chunk-frames", "6", "--workers", "2")
    assert marker.exists(), "no worker reached the fault hook"
    assert code == 0 and summary["retries"] >= 1 and summary["done"] == 1 and summary["frames"] == 24
    same_files(tmp_path / "out" / "long.npy" / "masks", want)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out" / "long.npy" / "masks").iterdir())


@pytest.fixture
def ray_cluster(monkeypatch):
    """A Ray head (`ray start --head --block`) on 127.0.0.1 at a free port, in its own process group; stopped by
    killing that group (never `ray stop`, which would end every Ray process on the machine)."""
    import shutil
    import tempfile
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live there (108-byte limit)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_exe = Path(sys.executable).with_name("ray")
    # Every Ray server on the loopback address; no token (Ray's default token file is per user, shared with
    # whatever else runs Ray here), for the head and for its clients (environment inherited).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([str(ray_exe), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", temp],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # the head answers on its port within a minute
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.05).close()
                break
            except OSError:
                threading.Event().wait(0.05)
        else:
            pytest.fail("the Ray head did not open its port")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_runs_the_same_job_on_a_cluster(export_b1, clips, reference, ray_cluster, tmp_path):
    """The command in its own process, as a user runs it (a process holds one Ray connection for its life)."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "tmanet", "batch", str(export_b1), *map(str, clips), "--out",
                           str(out), "--chunk-frames", "4", "--ray-address", ray_cluster, "--no-progress", "--json",
                           str(tmp_path / "summary.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["done"] == 3 and summary["workers"] == 2  # the head's 2 CPUs
    for clip in clips:
        same_files(out / clip.name / "masks", reference[clip.name])


def as_bag(mcap_path, folder) -> Path:
    """The same messages as a ROS 2 rosbag2 folder (.db3), written by rosbags."""
    from test_mcap import write_bag

    from tmanet.io.ros_images import COMPRESSED_IMAGE, IMAGE
    messages = []
    for topic, items in read_mcap(mcap_path).items():
        for _, m in items:
            header = {"stamp": {"sec": m.header.stamp.sec, "nanosec": m.header.stamp.nanosec},
                      "frame_id": m.header.frame_id}
            if hasattr(m, "encoding"):
                messages.append((topic, IMAGE, {"header": header, "height": m.height, "width": m.width,
                                                "encoding": m.encoding, "is_bigendian": m.is_bigendian,
                                                "step": m.step, "data": bytes(m.data)}))
            else:
                messages.append((topic, COMPRESSED_IMAGE, {"header": header, "format": m.format,
                                                           "data": bytes(m.data)}))
    messages.sort(key=lambda m: (m[2]["header"]["stamp"]["sec"], m[2]["header"]["stamp"]["nanosec"]))
    write_bag(folder, False, messages)
    return folder


def test_ros_bags_with_two_cameras_equal_run(export_b1, drive, tmp_path):  # noqa: F811
    """An MCAP and the same drive as a ROS 2 .db3 folder, in chunks of 3 messages (log-time ranges)."""
    pytest.importorskip("rosbags")
    bag = as_bag(drive["path"], tmp_path / "drive_bag")
    out = tmp_path / "out"
    code, summary = batch(export_b1, [drive["path"], bag], out, "--chunk-frames", "3", "--resize", "--workers", "2")
    assert code == 0 and summary["done"] == 2 and summary["frames"] == 22
    for source, name in ((drive["path"], "drive.mcap"), (bag, "drive_bag")):
        ref = tmp_path / f"{name}.ref.mcap"
        assert main(["run", str(export_b1), "--input", str(source), "--topic", FRONT, "--topic", REAR,
                     "--resize", "--output", str(ref), "--threads", "1", "--no-progress"]) == 0
        assert json.loads((out / name / "done.json").read_text())["chunks"] == 4
        want, got = read_mcap(ref), read_mcap(out / name / "masks.mcap")
        assert sorted(got) == sorted(want) == MASKS
        for camera in CAMERAS.values():  # one LabelInfo per camera, as tmanet run writes it
            labels = [[(t, [(c.class_id, c.class_name) for c in m.class_map]) for t, m in found[f"{camera}/label_info"]]
                      for found in (got, want)]
            assert labels[0] == labels[1] and len(labels[0]) == 1
        for topic in (f"{c}/mask" for c in CAMERAS.values()):
            assert len(got[topic]) == len(want[topic])
            for (t1, a), (t2, b) in zip(got[topic], want[topic]):
                assert (t1, a.header.stamp.sec, a.header.stamp.nanosec, a.header.frame_id, a.encoding) == \
                    (t2, b.header.stamp.sec, b.header.stamp.nanosec, b.header.frame_id, b.encoding)
                assert bytes(a.data) == bytes(b.data)
