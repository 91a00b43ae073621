"""MCAP (ROS 2) in and out, any camera size (``--resize``) and the ROS 2 node's core, on real MCAP files and
real CDR serialization (``mcap`` + ``mcap-ros2-support``); the rclpy glue itself is skipped without ROS 2."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mcap.reader import make_reader
from mcap_ros2._dynamic import generate_dynamic, serialize_dynamic
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer
from PIL import Image

from tmanet.cli import main
from tmanet.runtime import StreamingSegmenter
from tmanet.io.ros_images import COMPRESSED_IMAGE, IMAGE, MSGDEFS, image_fields, image_to_rgb
from tmanet.pictures import colorize
from tmanet.test_clips import make_noise_clip

H, W = 64, 128           # the tiny export's size
CAM_H, CAM_W = 80, 160   # the second camera's size (needs --resize)
EPOCH = 1_700_000_000    # header stamps in seconds, as a real recording's
FRONT, REAR = "/cam/front/image_raw", "/cam/rear/image_raw/compressed"
# Where each camera's outputs go: the image topic without its transport name (image_transport's convention).
CAMERAS = {FRONT: "/cam/front/image_raw", REAR: "/cam/rear/image_raw"}
MASKS = sorted(f"{c}/{k}" for c in CAMERAS.values() for k in ("mask", "label_info"))


# -- message helpers (what a recorder writes) -------------------------------------------------------------
def header(t: float, frame_id: str) -> dict:
    sec = int(t)
    return {"stamp": {"sec": EPOCH + sec, "nanosec": int(round((t - sec) * 1e9))}, "frame_id": frame_id}


def raw_image(rgb: np.ndarray, t: float, frame_id: str, encoding: str = "rgb8", pad: int = 0) -> dict:
    """An Image message of ``rgb`` in ``encoding``, each row padded by ``pad`` bytes (step > width)."""
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]),
              "bgra8": np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)]),
              "mono8": rgb[..., 0], "16UC1": rgb[..., :2]}[encoding]
    rows = np.ascontiguousarray(pixels).reshape(rgb.shape[0], -1)
    rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=255)
    return {"header": header(t, frame_id), "height": rgb.shape[0], "width": rgb.shape[1], "encoding": encoding,
            "is_bigendian": 0, "step": rows.shape[1], "data": rows.tobytes()}


def compressed_image(rgb: np.ndarray, t: float, frame_id: str, fmt: str) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
    return {"header": header(t, frame_id), "format": f"rgb8; {fmt} compressed bgr8", "data": buffer.getvalue()}


def write_mcap(path, messages):
    """``messages``: ``(topic, type, message dict)`` in log order; log time = the header stamp."""
    with open(path, "wb") as f, Writer(f) as writer:
        schemas = {kind: writer.register_msgdef(kind, MSGDEFS[kind]) for kind in (IMAGE, COMPRESSED_IMAGE)}
        for topic, kind, msg in messages:
            stamp = msg["header"]["stamp"]
            writer.write_message(topic, schemas[kind], msg, log_time=stamp["sec"] * 10**9 + stamp["nanosec"])


def read_mcap(path) -> dict:
    """``{topic: [(log_time, message)]}`` of every message, decoded as ROS 2 tools would."""
    out = {}
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for _schema, channel, message, decoded in reader.iter_decoded_messages():
            out.setdefault(channel.topic, []).append((message.log_time, decoded))
    return out


def decoded(msg: dict) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(msg["data"])).convert("RGB"))


def stamp(msg) -> float:
    return msg.header.stamp.sec - EPOCH + msg.header.stamp.nanosec * 1e-9


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    """Two cameras at different rates: front raw (rgb8/bgr8) 64x128 at 10 Hz with a dropped frame (0.3 s) and
    a 2.1 s gap; rear compressed (jpeg/png) 80x160 at 5 Hz. Returns the file and the frames each camera saw."""
    front = make_noise_clip(7, H, W, seed=21)
    rear = make_noise_clip(4, CAM_H, CAM_W, seed=22)
    front_times = [0.0, 0.1, 0.2, 0.4, 2.5, 2.6, 2.7]
    rear_times = [0.05, 0.25, 0.45, 0.65]
    messages = [(t, FRONT, IMAGE, raw_image(f, t, "front_cam", "rgb8" if i % 2 else "bgr8", pad=i % 3))
                for i, (f, t) in enumerate(zip(front, front_times))]
    messages += [(t, REAR, COMPRESSED_IMAGE, compressed_image(f, t, "rear_cam", "jpeg" if i % 2 else "png"))
                 for i, (f, t) in enumerate(zip(rear, rear_times))]
    messages.sort(key=lambda m: m[0])
    path = tmp_path_factory.mktemp("mcap") / "drive.mcap"
    write_mcap(path, [m[1:] for m in messages])
    rear_seen = [decoded(m[3]) for m in messages if m[1] == REAR]  # what a JPEG decoder gives back
    return {"path": path, "front": (front, front_times), "rear": (np.stack(rear_seen), rear_times)}


# -- message conversion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_raw_encodings_decode_to_rgb(encoding):
    rgb = make_noise_clip(1, 5, 7, seed=1)[0]
    got = image_to_rgb(raw_image(rgb, 0.0, "c", encoding, pad=3))
    want = np.repeat(rgb[..., :1], 3, axis=2) if encoding == "mono8" else rgb
    assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_compressed_images_decode_and_bad_images_say_why():
    rgb = make_noise_clip(1, 16, 24, seed=2)[0]
    assert np.array_equal(image_to_rgb(compressed_image(rgb, 0.0, "c", "png")), rgb)
    jpeg = compressed_image(rgb, 0.0, "c", "jpeg")
    assert np.array_equal(image_to_rgb(jpeg), decoded(jpeg))
    with pytest.raises(ValueError, match=r"unsupported image encoding '16UC1' \(supported: rgb8, bgr8"):
        image_to_rgb(raw_image(rgb, 0.0, "c", "16UC1"))
    with pytest.raises(ValueError, match="unsupported compressed image format 'qoi'"):
        image_to_rgb({**jpeg, "format": "qoi"})
    short = raw_image(rgb, 0.0, "c")
    with pytest.raises(ValueError, match="holds 1104 bytes, needs 1152"):
        image_to_rgb({**short, "data": short["data"][:-48]})
    with pytest.raises(ValueError, match="cannot decode the 'rgb8; png compressed bgr8' image"):
        image_to_rgb({**compressed_image(rgb, 0.0, "c", "png"), "data": b"not a png"})


def test_mask_fields_round_trip_through_cdr():
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    encode = serialize_dynamic(IMAGE, MSGDEFS[IMAGE])[IMAGE]
    decode = generate_dynamic(IMAGE, MSGDEFS[IMAGE])[IMAGE]
    msg = decode(encode(image_fields(mask, header(1.25, "cam"))))
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("mono8", 3, 4, 4)
    assert np.array_equal(image_to_rgb(msg)[..., 0], mask)
    assert stamp(msg) == pytest.approx(1.25) and msg.header.frame_id == "cam"


# -- any camera size ----------------------------------------------------------------------------------------
def test_resize_equals_explicit_interpolation(export_b1):
    frames = make_noise_clip(3, CAM_H, CAM_W, seed=5)
    seg = StreamingSegmenter.open(export_b1, resize=True, return_logits=True)
    plain = StreamingSegmenter.open(export_b1, return_logits=True)
    align = plain.align_corners
    for frame in frames:
        got = seg.push(frame)
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        small = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False).round().clamp(0, 255)
        small = small.to(torch.uint8)[0].permute(1, 2, 0).numpy()
        logits = torch.from_numpy(plain.push(small).logits)[None]
        full = F.interpolate(logits, size=(CAM_H, CAM_W), mode="bilinear", align_corners=align)[0]
        assert got.mask.shape == (CAM_H, CAM_W) and got.logits.shape == (19, CAM_H, CAM_W)
        assert np.array_equal(got.logits, full.numpy())
        assert np.array_equal(got.mask, full.argmax(0).numpy().astype(np.uint8))
    same = StreamingSegmenter.open(export_b1, resize=True).push(make_noise_clip(1, H, W, seed=6)[0])
    assert np.array_equal(same.mask, StreamingSegmenter.open(export_b1).push(make_noise_clip(1, H, W, seed=6)[0]).mask)


def test_mismatched_size_names_resize(export_b1, tmp_path, capsys):
    with pytest.raises(ValueError, match="resize=True"):
        StreamingSegmenter.open(export_b1).push(make_noise_clip(1, CAM_H, CAM_W, seed=1)[0])
    with pytest.raises(ValueError, match="resize applies to whole mode"):
        StreamingSegmenter.open(export_b1, mode="slide", resize=True)
    np.save(tmp_path / "cam.npy", make_noise_clip(2, 48, 96, seed=1))
    assert main(["run", str(export_b1), "-i", str(tmp_path / "cam.npy"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resize" in err and len(err.strip().splitlines()) == 1
    assert main(["run", str(export_b1), "-i", str(tmp_path / "cam.npy"), "--resize",
                 "--save-logits", str(tmp_path / "l.npy"), "--no-progress"]) == 0
    assert np.load(tmp_path / "l.npy").shape == (2, 19, 48, 96)


def test_a_bag_camera_of_another_size_names_resize_not_slide(export_b1, drive, tmp_path, capsys):
    """A bag's cameras run whole frames (slide mode is refused for bags), so the hint names --resize only."""
    assert main(["run", str(export_b1), "--input", str(drive["path"]), "--topic", REAR, "--output",
                 str(tmp_path / "o.mcap"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from the export size 64x128" in err, err
    assert "`--resize`" in err and "slide" not in err


# -- tmanet run on an MCAP ----------------------------------------------------------------------------------
def api_masks(export_dir, frames, times):
    seg = StreamingSegmenter.open(export_dir, resize=True, max_gap=1.0)
    results = [seg.push(f, timestamp=EPOCH + t) for f, t in zip(frames, times)]
    return [r.mask for r in results], [r.index for r in results]


def test_mcap_two_cameras_match_the_python_api(export_b1, drive, tmp_path, capsys):
    out = tmp_path / "out" / "masks.mcap"
    assert main(["run", str(export_b1), "--input", str(drive["path"]), "--topic", FRONT, "--topic", REAR,
                 "--resize", "--color", "--output", str(out), "--no-progress"]) == 0
    assert "11 images from 2 topic(s)" in capsys.readouterr().out
    written = read_mcap(out)
    assert sorted(written) == sorted(f"{c}/{k}" for c in CAMERAS.values() for k in ("mask", "color_mask", "label_info"))
    seg = StreamingSegmenter.open(export_b1)
    palette = seg.palette
    for topic, camera, frame_id in ((FRONT, "front", "front_cam"), (REAR, "rear", "rear_cam")):
        frames, times = drive[camera]
        want, index = api_masks(export_b1, frames, times)
        masks, colors = written[f"{CAMERAS[topic]}/mask"], written[f"{CAMERAS[topic]}/color_mask"]
        assert len(masks) == len(colors) == len(frames)
        (label_time, labels), = written[f"{CAMERAS[topic]}/label_info"]  # once, with the first mask
        assert label_time == masks[0][0] and labels.header.frame_id == frame_id
        assert [(c.class_id, c.class_name) for c in labels.class_map] == list(enumerate(seg.class_names))
        for (log_time, m), (_, c), mask, t in zip(masks, colors, want, times):
            assert (m.encoding, c.encoding, m.header.frame_id, c.header.frame_id) == ("mono8", "rgb8", frame_id,
                                                                                     frame_id)
            assert stamp(m) == stamp(c) == pytest.approx(t, abs=1e-9)
            assert log_time == EPOCH * 10**9 + round(t * 1e9)
            assert np.array_equal(image_to_rgb(m)[..., 0], mask)
            assert np.array_equal(image_to_rgb(c), colorize(mask, palette))
        # the scenario: the dropped frame keeps the front memory, the 2.1 s gap resets it
        assert index == ([0, 1, 2, 3, 0, 1, 2] if camera == "front" else [0, 1, 2, 3])


def test_mcap_images_are_decoded_ahead_in_the_reading_thread(export_b1, drive, tmp_path, monkeypatch):
    """Parsing and pixel conversion run in the reading thread, ahead of the engines, as a video's decoding does."""
    import threading

    import tmanet.io.ros_images
    threads = []

    def recording(msg):
        threads.append(threading.current_thread().name)
        return image_to_rgb(msg)
    monkeypatch.setattr(tmanet.io.ros_images, "image_to_rgb", recording)
    assert main(["run", str(export_b1), "--input", str(drive["path"]), "--topic", FRONT, "--topic", REAR,
                 "--resize", "--output", str(tmp_path / "masks.mcap"), "--no-progress"]) == 0
    assert threads == ["tmanet-read"] * 11


def test_mcap_without_topic_segments_every_image_topic(export_b1, drive, tmp_path, capsys):
    every = tmp_path / "every.mcap"
    assert main(["run", str(export_b1), "--input", str(drive["path"]), "--output", str(every), "--resize",
                 "--no-progress"]) == 0
    named = tmp_path / "named.mcap"
    assert main(["run", str(export_b1), "--input", str(drive["path"]), "--output", str(named), "--resize",
                 "--topic", FRONT, "--topic", REAR, "--no-progress"]) == 0
    got, want = read_mcap(every), read_mcap(named)
    assert sorted(got) == sorted(want) == MASKS
    for topic in (f"{c}/mask" for c in CAMERAS.values()):
        assert [(t, image_to_rgb(m).tobytes()) for t, m in got[topic]] == [(t, image_to_rgb(m).tobytes())
                                                                          for t, m in want[topic]]
    capsys.readouterr()
    for output in ([], ["--output", str(tmp_path / "o.mp4")]):  # no MCAP output: a usage error listing the topics
        assert main(["run", str(export_b1), "--input", str(drive["path"]), *output, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "writes an MCAP: --output OUT.mcap" in err and f"{FRONT} (Image), {REAR} (CompressedImage)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["every.mcap", "named.mcap"]


def run_fails(export_b1, mcap_path, out, *flags):
    """Runs ``tmanet run`` on ``mcap_path`` into ``out`` (holding an older file): exit 2, the older file
    intact, no temporary file left."""
    out.write_bytes(b"an older result")
    code = main(["run", str(export_b1), "--input", str(mcap_path), "--output", str(out), "--no-progress",
                 *flags])
    assert code == 2
    assert out.read_bytes() == b"an older result" and list(out.parent.iterdir()) == [out]


@pytest.mark.parametrize("case", ["unknown topic", "unsupported encoding", "truncated", "not an mcap"])
def test_mcap_bad_input_one_line_error_nothing_written(export_b1, drive, tmp_path, capsys, case):
    out = tmp_path / "out" / "masks.mcap"
    out.parent.mkdir()
    path, flags = drive["path"], ["--topic", FRONT, "--resize"]
    if case == "unknown topic":
        flags = ["--topic", FRONT, "--topic", "/cam/left"]
        expected = f"has no image topic /cam/left; its image topics: {FRONT} (Image), {REAR} (CompressedImage)"
    elif case == "unsupported encoding":  # good frames first: the failure comes part-way through the output
        path = tmp_path / "depth.mcap"
        frames = make_noise_clip(4, H, W, seed=3)
        encodings = ["rgb8", "rgb8", "rgb8", "16UC1"]
        write_mcap(path, [(FRONT, IMAGE, raw_image(f, i * 0.1, "front_cam", e))
                          for i, (f, e) in enumerate(zip(frames, encodings))])
        expected = "message at log time 1700000000300000000 ns: unsupported image encoding '16UC1'"
    elif case == "truncated":
        path = tmp_path / "cut.mcap"
        data = drive["path"].read_bytes()
        path.write_bytes(data[:len(data) * 2 // 3])
        expected = "cut.mcap: the MCAP file ends without its footer (truncated"
    else:
        path = tmp_path / "fake.mcap"
        path.write_bytes(b"hello" * 100)
        expected = "fake.mcap: not an MCAP file"
    run_fails(export_b1, path, out, *flags)
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_mcap_corrupt_chunk_fails_part_way_without_output(export_b1, drive, tmp_path, capsys):
    data = bytearray(drive["path"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed chunks: the CRC check or the decompressor catches it
    (tmp_path / "bad.mcap").write_bytes(bytes(data))
    out = tmp_path / "out" / "masks.mcap"
    out.parent.mkdir()
    run_fails(export_b1, tmp_path / "bad.mcap", out, "--topic", FRONT, "--topic", REAR, "--resize")
    assert "bad.mcap: damaged chunk at byte " in capsys.readouterr().err


def write_chunked(path, frames, chunk_size=60_000):
    """``frames`` on FRONT at 10 Hz, in chunks of ~``chunk_size`` bytes (two or three 64x128 frames each)."""
    with open(path, "wb") as f, Writer(f, chunk_size=chunk_size) as writer:
        schema = writer.register_msgdef(IMAGE, MSGDEFS[IMAGE])
        for i, frame in enumerate(frames):
            msg = raw_image(frame, i * 0.1, "front_cam")
            stamp = msg["header"]["stamp"]
            writer.write_message(FRONT, schema, msg, log_time=stamp["sec"] * 10**9 + stamp["nanosec"])


def chunk_layout(path) -> list[tuple[int, int, int]]:
    """``(chunk start, chunk length, messages in it)`` of each chunk, from the file's own index."""
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        out = []
        for ci in sorted(summary.chunk_indexes, key=lambda c: c.chunk_start_offset):
            f.seek(ci.chunk_start_offset)
            out.append((ci.chunk_start_offset, ci.chunk_length,
                        sum(1 for _ in reader.iter_messages(starting_at=ci.message_start_time,
                                                            ending_at=ci.message_end_time))))
    return out


@pytest.fixture()
def damaged_log(tmp_path):
    """A 10-frame MCAP with 2,000 bytes flipped in the middle of its second chunk (as the issue's probe did),
    and how many frames that chunk held."""
    frames = make_noise_clip(10, H, W, seed=5)
    good = tmp_path / "good.mcap"
    write_chunked(good, frames)
    layout = chunk_layout(good)
    assert len(layout) >= 3 and sum(n for *_, n in layout) == 10
    start, length, lost = layout[1]
    data = bytearray(good.read_bytes())
    middle = start + length // 2
    for i in range(middle - 1000, middle + 1000):
        data[i] ^= 0x5A
    bad = tmp_path / "bad.mcap"
    bad.write_bytes(bytes(data))
    return {"path": bad, "frames": frames, "chunk": start, "lost": lost, "before": layout[0][2]}


def test_damaged_mcap_chunk_is_one_line_naming_where(export_b1, damaged_log, tmp_path, capsys):
    from tmanet.io.driving_logs import LogReadError
    from tmanet.io.mcap import read_images
    from tmanet.io.video import open_frames
    bad, chunk = damaged_log["path"], damaged_log["chunk"]
    with pytest.raises(LogReadError, match=f"bad.mcap: damaged chunk at byte {chunk} \\(messages logged "):
        list(read_images(bad, [FRONT]))
    with pytest.raises(LogReadError, match=f"damaged chunk at byte {chunk}"):
        list(open_frames(f"{bad}:{FRONT}"))
    out = tmp_path / "out" / "masks.mcap"
    out.parent.mkdir()
    run_fails(export_b1, bad, out, "--topic", FRONT)
    err = capsys.readouterr().err
    assert f"damaged chunk at byte {chunk}" in err and len(err.strip().splitlines()) == 1, err
    masks = tmp_path / "masks"  # the one-topic source: the same line
    assert main(["run", str(export_b1), "--input", f"{bad}:{FRONT}", "--save-masks", str(masks),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"damaged chunk at byte {chunk}" in err and len(err.strip().splitlines()) == 1, err


def test_allow_truncated_skips_a_damaged_mcap_chunk(export_b1, damaged_log, tmp_path, capsys, caplog):
    from tmanet.io.mcap import read_images
    from tmanet.io.video import open_frames
    bad, frames, lost = damaged_log["path"], damaged_log["frames"], damaged_log["lost"]
    before = damaged_log["before"]
    got = list(read_images(bad, [FRONT], skip_damaged=True))
    assert len(got) == 10 - lost
    assert "frames lost" in caplog.text and f"damaged chunk at byte {damaged_log['chunk']}" in caplog.text
    assert f": {lost} frames lost" in caplog.text
    kept = [np.array_equal(rgb, f) for (rgb, _), f in zip(open_frames(f"{bad}:{FRONT}", allow_truncated=True),
                                                        list(frames[:before]) + list(frames[before + lost:]))]
    assert len(kept) == 10 - lost and all(kept)  # the frames around the damaged chunk are the recorded ones
    masks = tmp_path / "masks"
    assert main(["run", str(export_b1), "--input", f"{bad}:{FRONT}", "--save-masks", str(masks),
                 "--allow-truncated", "--no-progress"]) == 0
    assert len(list(masks.glob("*.png"))) == 10 - lost


def test_mcap_options_that_do_not_apply(export_b1, drive, tmp_path, capsys):
    base = ["run", str(export_b1), "--input", str(drive["path"]), "--topic", FRONT, "--no-progress"]
    assert main(base + ["--output", str(tmp_path / "o.mp4")]) == 2
    assert "writes an MCAP: --output OUT.mcap" in capsys.readouterr().err
    assert main(base + ["--output", str(drive["path"])]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["run", str(export_b1), "--input", "x.npy", "--topic", FRONT]) == 2
    assert "apply to a ROS bag input" in capsys.readouterr().err


# -- an MCAP topic as a frame source (calibrate, compare, build, export checks, run to video/PNGs) -----------
def test_an_mcap_topic_is_a_frame_source(export_b1, drive, tmp_path, capsys):
    from tmanet.io.video import open_frames
    frames, times = drive["front"]
    source = open_frames(f"{drive['path']}:{FRONT}", max_frames=5)
    got = list(source)
    assert source.kind == "rosbag" and source.count == 5 and len(got) == 5
    assert all(np.array_equal(f, g) for (f, _), g in zip(got, frames))
    assert [t for _, t in got] == pytest.approx([EPOCH + t for t in times[:5]], abs=1e-6)
    with pytest.raises(ValueError, match=f"has 2 image topics \\({FRONT}, {REAR}\\): name one as .*:/TOPIC"):
        open_frames(drive["path"])
    with pytest.raises(ValueError, match=f"has no image topic /cam/left; its image topics: {FRONT}, {REAR}"):
        open_frames(f"{drive['path']}:/cam/left")
    from tmanet.calibration.compare import _frame_iter
    from tmanet.calibration.quantize import read_clip
    clip, kind = read_clip(f"{drive['path']}:{FRONT}", 3)
    assert kind == "rosbag" and np.array_equal(clip, frames[:3])
    count, it, _ = _frame_iter(f"{drive['path']}:{FRONT}", 2)
    assert count == 2 and np.array_equal(np.stack(list(it)), frames[:2])
    assert main(["run", str(export_b1), "--input", f"{drive['path']}:{FRONT}", "--save-masks",
                 str(tmp_path / "masks"), "--no-progress"]) == 0
    want, _ = api_masks(export_b1, frames, times)
    pngs = sorted((tmp_path / "masks").glob("*.png"))
    assert len(pngs) == len(want) and all(np.array_equal(np.asarray(Image.open(p)), w) for p, w in zip(pngs, want))


# -- ROS 2 .db3 and ROS 1 .bag (rosbags) --------------------------------------------------------------------
def write_bag(path, ros1: bool, messages):
    """A rosbag2 folder (sqlite3 .db3) or a ROS 1 .bag of ``(topic, type, message dict)``, written by rosbags."""
    from rosbags.rosbag1 import Writer as Writer1
    from rosbags.rosbag2 import Writer as Writer2
    from rosbags.typesys import Stores, get_typestore
    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    T = store.types
    with (Writer1(path) if ros1 else Writer2(path, version=9)) as writer:
        connections = {}
        for topic, kind, msg in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, kind, typestore=store)
            h = msg["header"]
            stamp_ = T["builtin_interfaces/msg/Time"](**h["stamp"])
            head = T["std_msgs/msg/Header"](**({"seq": 0} if ros1 else {}), stamp=stamp_, frame_id=h["frame_id"])
            fields = {k: np.frombuffer(v, np.uint8) if k == "data" else v for k, v in msg.items() if k != "header"}
            ros = T[kind](header=head, **fields)
            raw = store.serialize_ros1(ros, kind) if ros1 else store.serialize_cdr(ros, kind)
            writer.write(connections[topic], h["stamp"]["sec"] * 10**9 + h["stamp"]["nanosec"], raw)


@pytest.mark.parametrize("ros1", [False, True], ids=["ros2-db3", "ros1-bag"])
def test_ros_bags_segment_like_mcap(export_b1, drive, tmp_path, capsys, ros1):
    pytest.importorskip("rosbags", reason="the optional rosbags package (extra [rosbags], installed by make test)")
    front, times = drive["front"][0][:4], drive["front"][1][:4]
    rear = make_noise_clip(2, CAM_H, CAM_W, seed=23)
    messages = [(FRONT, IMAGE, raw_image(f, t, "front_cam", "bgr8")) for f, t in zip(front, times)]
    messages += [(REAR, COMPRESSED_IMAGE, compressed_image(f, t, "rear_cam", "png")) for f, t in zip(rear, [0.05, 0.25])]
    messages.sort(key=lambda m: stamp_ns(m[2]))
    bag = tmp_path / ("drive.bag" if ros1 else "drive_bag")
    write_bag(bag, ros1, messages)
    out = tmp_path / "masks.mcap"
    assert main(["run", str(export_b1), "--input", str(bag), "--no-progress"]) == 2  # no output: the topics listed
    assert f"{FRONT} (Image), {REAR} (CompressedImage)" in capsys.readouterr().err
    assert main(["run", str(export_b1), "--input", str(bag), "--resize", "--output", str(out),  # every topic
                 "--no-progress"]) == 0
    written = read_mcap(out)
    for topic, frames, frame_times in ((FRONT, front, times), (REAR, rear, [0.05, 0.25])):
        want, _ = api_masks(export_b1, frames, frame_times)
        got = written[f"{CAMERAS[topic]}/mask"]
        assert [stamp(m) for _, m in got] == pytest.approx(frame_times, abs=1e-9)
        assert all(np.array_equal(image_to_rgb(m)[..., 0], w) for (_, m), w in zip(got, want))
    (tmp_path / "broken.bag").write_bytes(b"#ROSBAG V2.0\n" + b"\0" * 64)
    assert main(["run", str(export_b1), "--input", str(tmp_path / "broken.bag"), "--topic", FRONT,
                 "--output", str(tmp_path / "b.mcap"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "broken.bag: not a readable ROS bag" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.mcap").exists()


def stamp_ns(msg: dict) -> int:
    return msg["header"]["stamp"]["sec"] * 10**9 + msg["header"]["stamp"]["nanosec"]


# -- the ROS 2 node -----------------------------------------------------------------------------------------
def cdr_round_trip(kind, msg):
    """``msg`` serialized to CDR and decoded again, as it crosses a ROS 2 topic."""
    return generate_dynamic(kind, MSGDEFS[kind])[kind](serialize_dynamic(kind, MSGDEFS[kind])[kind](msg))


def test_node_core_segments_each_camera_as_its_own_stream(export_b1):
    from tmanet.runtime.ros2 import SegmentationNodeCore
    with pytest.raises(ValueError, match="export_dir is required"):
        SegmentationNodeCore("")
    core = SegmentationNodeCore(str(export_b1), max_gap=1.0, resize=True)
    a, b = make_noise_clip(4, H, W, seed=31), make_noise_clip(3, CAM_H, CAM_W, seed=32)
    times_a, times_b = [0.0, 0.1, 3.0, 3.1], [0.0, 0.2, 0.4]
    inputs = [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2)]
    got = {"a": [], "b": []}
    for cam, i in inputs:
        frame, t = (a[i], times_a[i]) if cam == "a" else (b[i], times_b[i])
        mask, color = core.on_image(cdr_round_trip(IMAGE, raw_image(frame, t, cam, "bgr8")), color=(cam == "a"))
        mask = cdr_round_trip(IMAGE, mask)
        assert mask.header.frame_id == cam and stamp(mask) == pytest.approx(t, abs=1e-9)
        assert (color is None) == (cam == "b")
        got[cam].append(image_to_rgb(mask)[..., 0])
    core.close()
    for cam, frames, times in (("a", a, times_a), ("b", b, times_b)):
        want, _ = api_masks(export_b1, frames, times)
        assert all(np.array_equal(g, w) for g, w in zip(got[cam], want))


def test_node_without_ros_says_what_it_needs():
    import subprocess
    import sys
    code = "import sys; sys.modules['rclpy'] = None; from tmanet.runtime.ros2 import main; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "tmanet.runtime.ros2 needs rclpy, which comes with ROS 2: source its setup (e.g. /opt/ros/jazzy/setup.bash) "
        "in the Python environment that has tmanet"]


def test_rclpy_node_publishes_masks(export_b1):
    rclpy = pytest.importorskip(
        "rclpy", reason="rclpy comes with a ROS 2 installation (not installable from PyPI); the node's "
                        "message conversion and segmentation are tested without it above")
    from builtin_interfaces.msg import Time
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image as RosImage
    from std_msgs.msg import Header

    from tmanet.runtime.ros2 import build_node
    rclpy.init()
    try:
        node = build_node({"export_dir": str(export_b1)})
        client = rclpy.create_node("tmanet_test_client")
        received = []
        client.create_subscription(RosImage, "/tmanet_segmentation/out/mask", received.append, 10)
        publisher = client.create_publisher(RosImage, "/tmanet_segmentation/in/image", 10)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.add_node(client)
        frame = make_noise_clip(1, H, W, seed=41)[0]
        msg = raw_image(frame, 0.0, "cam")
        msg["header"] = Header(stamp=Time(sec=EPOCH, nanosec=0), frame_id="cam")
        for _ in range(200):  # bounded: up to ~20 s for discovery and the first frame
            if received:
                break
            publisher.publish(RosImage(**msg))
            executor.spin_once(timeout_sec=0.1)
        assert received, "no mask published within 20 s"
        want = StreamingSegmenter.open(export_b1).push(frame).mask
        assert received[0].header.frame_id == "cam"
        assert np.array_equal(np.frombuffer(bytes(received[0].data), np.uint8).reshape(H, W), want)
        node.destroy_node()
        client.destroy_node()
    finally:
        rclpy.try_shutdown()


def test_damaged_ros_bags_are_one_line_or_skipped(tmp_path, caplog):
    """2,000 bytes flipped: inside the .db3's message pages reading stops at the damage (one line naming the
    message; --allow-truncated keeps what was read and counts the rest); at a ROS 1 bag's first record, the
    bag is refused at open. (ROS 1 bags have no checksums: flipped pixel bytes go unnoticed.)"""
    pytest.importorskip("rosbags", reason="the optional rosbags package (extra [rosbags], installed by make test)")
    from tmanet.io.driving_logs import LogReadError
    from tmanet.io.video import open_frames
    frames = make_noise_clip(10, H, W, seed=3)
    for ros1, where in ((False, 1 / 3), (True, None)):
        path = tmp_path / ("drive.bag" if ros1 else "drive")
        write_bag(path, ros1, [(FRONT, IMAGE, raw_image(f, i * 0.1, "front_cam")) for i, f in enumerate(frames)])
        target = path if ros1 else next(path.glob("*.db3"))
        data = bytearray(target.read_bytes())
        middle = 4096 + 10 if ros1 else int(len(data) * where)
        for i in range(middle - 1000, middle + 1000):
            data[i] ^= 0x5A
        target.write_bytes(bytes(data))
        if ros1:
            with pytest.raises(LogReadError, match="drive.bag: not a readable ROS bag"):
                list(open_frames(f"{path}:{FRONT}", allow_truncated=True))
            continue
        with pytest.raises(LogReadError, match=r"drive: damaged after message \d+ \(log time \d+ ns\): database "
                                               "disk image is malformed"):
            list(open_frames(f"{path}:{FRONT}"))
        kept = list(open_frames(f"{path}:{FRONT}", allow_truncated=True))
        assert 0 < len(kept) < 10 and all(np.array_equal(g, f) for (g, _), f in zip(kept, frames))
        assert f"stopped there, {10 - len(kept)} frames lost (--allow-truncated)" in caplog.text


def test_outputs_of_a_compressed_topic_drop_the_transport_name():
    from tmanet.io.ros_images import output_topic
    assert output_topic("/cam/image_raw/compressed", "mask") == "/cam/image_raw/mask"
    assert output_topic("/cam/image_raw/theora", "label_info") == "/cam/image_raw/label_info"
    assert output_topic("/cam/image_raw", "mask") == "/cam/image_raw/mask"
    assert output_topic("/compressed", "mask") == "/compressed/mask"  # a bare transport name is the camera


def test_the_node_latches_the_class_names_and_its_launch_file_takes_every_parameter():
    import ast

    from tmanet.runtime import ros2
    core = ros2.SegmentationNodeCore.__new__(ros2.SegmentationNodeCore)
    core.streams = type("Streams", (), {"class_names": ["road", "car"]})()
    assert core.label_info()["class_map"] == [{"class_id": 0, "class_name": "road"},
                                              {"class_id": 1, "class_name": "car"}]
    launch = Path(ros2.__file__).with_name("ros2.launch.py").read_text()
    tree = ast.parse(launch)
    (table,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "PARAMETERS"]
    declared = ast.literal_eval(table)
    assert declared == {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in ros2.PARAMETERS.items()}
