"""Property-based fuzzing (hypothesis) of the readers of untrusted files: the manifest loader (manifest.json and
the ONNX graphs it vouches for), the ``.npy`` reader, the MCAP reader and the rosbag readers (ROS 2 ``.db3``,
ROS 1 ``.bag``). Random byte flips, damaged stretches, truncations and field edits of valid files may only
raise *our* error types, never another exception, and never allocate beyond a bound.

Our error types (what the CLI prints as one line, exit 2): :class:`tmanet.errors.UserError` and its subclasses
(``FrameSourceError``, ``TruncatedVideoError``, ``LogReadError``, ``RingTooLarge``) and
:class:`tmanet.manifest.ManifestError`. A bare ValueError, KeyError, protobuf/zstd/sqlite error or
MemoryError escaping is a bug.

Allocations are measured with tracemalloc (Python objects, bytes and numpy buffers: what a header claiming a
terabyte would make us allocate). Examples are few and derandomized (no example database), so CI is fast and
deterministic.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmanet.errors import UserError
from tmanet.manifest import ManifestError, load_manifest
from tmanet.test_clips import make_noise_clip
from tmanet.io.video import open_frames, read_npy

OURS = (UserError, ManifestError)
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
H, W = 16, 24  # small frames: many examples per second


def only_ours(read, bound: int) -> BaseException | None:
    """Run ``read()``; it may return or raise one of :data:`OURS` (returned), nothing else; its peak traced
    allocation stays under ``bound`` bytes."""
    tracemalloc.start()
    try:
        read()
        error = None
    except OURS as e:
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < bound, f"allocated {peak} bytes (bound {bound})"
    if error is not None:
        assert "\n" not in str(error), str(error)  # one line
    return error


# -- damage: flips (single bytes, biased to the ends where headers and indexes live), stretches, cuts ------------
@st.composite
def damage(draw, size: int):
    """``(flips [(offset, xor)], stretch (start, length) or None, cut or None)`` for a file of ``size`` bytes."""
    offset = st.one_of(st.integers(0, min(size, 512) - 1), st.integers(max(0, size - 512), size - 1),
                       st.integers(0, size - 1))
    flips = draw(st.lists(st.tuples(offset, st.integers(1, 255)), max_size=8))
    stretch = draw(st.none() | st.tuples(st.integers(0, size - 1), st.integers(1, 2000)))
    cut = draw(st.none() | st.integers(0, size - 1))
    if not flips and stretch is None and cut is None:
        flips = [(size // 2, 0xFF)]
    return flips, stretch, cut


def damaged(data: bytes, how) -> bytes:
    flips, stretch, cut = how
    out = bytearray(data)
    for offset, xor in flips:
        out[offset] ^= xor
    if stretch is not None:
        start, length = stretch
        for i in range(start, min(len(out), start + length)):
            out[i] ^= 0x5A
    return bytes(out if cut is None else out[:cut])


# -- .npy ---------------------------------------------------------------------------------------------------
NPY_BOUND = 8 << 20


def npy_bytes(shape, descr="|u1", extra=b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    header = header.ljust(118 - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + extra


def read_clip(path):
    read_npy(path, mmap=False)
    for _ in open_frames(path):
        pass


@settings(FUZZ, max_examples=60)
@given(how=damage(npy_bytes((2, H, W, 3)).__len__() + 2 * H * W * 3))
def test_npy_reader_damaged_bytes(tmp_path_factory, how):
    clip = make_noise_clip(2, H, W, seed=1)
    path = tmp_path_factory.getbasetemp() / "fuzz.npy"
    path.write_bytes(damaged(npy_bytes(clip.shape, extra=clip.tobytes()), how))
    only_ours(lambda: read_clip(path), NPY_BOUND)


@settings(FUZZ, max_examples=60)
@given(shape=st.lists(st.integers(0, 2**40), min_size=0, max_size=5),
       descr=st.sampled_from(["|u1", "<f4", "<f8", ">i8", "|b1", "<c16", "|V1000000", "<U1000"]))
def test_npy_header_claims_are_checked_before_allocating(tmp_path_factory, shape, descr):
    """A header claiming any shape (up to 2**40 per axis, a terabyte array) over 1,000 bytes of data: refused
    (or read, when it fits in the data) without allocating beyond the file's size."""
    path = tmp_path_factory.getbasetemp() / "claims.npy"
    path.write_bytes(npy_bytes(shape, descr, extra=bytes(1000)))
    only_ours(lambda: read_clip(path), NPY_BOUND)


def test_terabyte_npy_header_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_bytes((10**6, 1000, 1000, 3), extra=bytes(100)))
    error = only_ours(lambda: read_npy(path, mmap=False), NPY_BOUND)
    assert "announces uint8 (1000000, 1000, 1000, 3) (3000000000000 bytes) but the file holds 100" in str(error)


# -- manifest.json and the graphs it vouches for ------------------------------------------------------------------
MANIFEST_BOUND = 64 << 20  # the tiny export's graphs are ~1 MB; a manifest value must not size anything


@pytest.fixture(scope="module")
def export_copy(export_b1, tmp_path_factory):
    """A scratch copy of the tiny export and its original manifest and memory-head bytes."""
    exp = tmp_path_factory.mktemp("fuzz_export") / "exp"
    shutil.copytree(export_b1, exp)
    load_manifest(exp)  # imports (onnx, protobuf) happen outside the measured calls
    return exp, (exp / "manifest.json").read_text(), (exp / "memory_head.onnx").read_bytes()


def restore(exp, manifest, graph):
    (exp / "manifest.json").write_text(manifest)
    (exp / "memory_head.onnx").write_bytes(graph)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from([0, 1, 2, 3, 5, 8, 16, 19, 64, 128, 10**9, "dynamic"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
FIELDS = ["sequence_num", "key_channels", "value_channels", "num_classes", "input_size", "feature_size", "batch",
          "max_batch", "precision", "files", "class_names", "palette", "slide_crop", "slide_stride", "query_chunk",
          "align_corners", "config", "format", "checkpoint"]


@settings(FUZZ, max_examples=80)
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES | st.just("<delete>")), min_size=1,
                      max_size=3))
def test_manifest_field_edits(export_copy, edits):
    exp, manifest, graph = export_copy
    m = json.loads(manifest)
    for field, value in edits:
        if value == "<delete>":
            m.pop(field, None)
        else:
            m[field] = value
    (exp / "manifest.json").write_text(json.dumps(m))
    try:
        only_ours(lambda: open_and_push(exp), MANIFEST_BOUND)
    finally:
        restore(exp, manifest, graph)


def open_and_push(exp):
    """What `tmanet run` does with an export: load it, and where it loads, open it and segment a frame."""
    from tmanet.runtime import StreamingSegmenter
    spec = load_manifest(exp)
    with StreamingSegmenter.open(exp) as seg:
        seg.push(make_noise_clip(1, *spec.input_size, seed=0)[0])


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_manifest_bytes_and_graph_bytes_damaged(export_copy, data):
    """manifest.json damaged, or the memory head damaged with its SHA256 updated (so that the graph is parsed)."""
    exp, manifest, graph = export_copy
    try:
        if data.draw(st.booleans(), label="damage the graph"):
            bad = damaged(graph, data.draw(damage(len(graph))))
            (exp / "memory_head.onnx").write_bytes(bad)
            m = json.loads(manifest)
            m["files"]["memory_head.onnx"] = {"sha256": hashlib.sha256(bad).hexdigest(), "bytes": len(bad)}
            (exp / "manifest.json").write_text(json.dumps(m))
        else:
            raw = manifest.encode()
            (exp / "manifest.json").write_bytes(damaged(raw, data.draw(damage(len(raw)))))
        only_ours(lambda: load_manifest(exp), MANIFEST_BOUND)
    finally:
        restore(exp, manifest, graph)


# -- MCAP ---------------------------------------------------------------------------------------------------
LOG_BOUND = 32 << 20
TOPIC = "/cam/front/image_raw"


@pytest.fixture(scope="module")
def small_mcap(tmp_path_factory) -> bytes:
    """Six 16x24 frames in chunks of two or three (zstd), with statistics, indexes and CRCs."""
    from test_mcap import write_chunked
    path = tmp_path_factory.mktemp("fuzz_mcap") / "small.mcap"
    write_chunked(path, make_noise_clip(6, H, W, seed=2), chunk_size=2500)
    read_log(path, TOPIC)  # imports outside the measured calls
    return path.read_bytes()


def read_log(path, topic):
    """Everything a run does with a log: topics, counts, messages (strict and skipping), frames."""
    from tmanet.io.driving_logs import log_reader
    reader = log_reader(path)
    reader.image_topics(path)
    reader.count_messages(path, [topic])
    for skip in (False, True):
        for read in (lambda: list(reader.read_images(path, [topic], skip_damaged=skip)),
                     lambda: list(open_frames(f"{path}:{topic}", allow_truncated=skip))):
            try:
                read()
            except OURS as e:
                assert "\n" not in str(e), str(e)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_mcap_reader_damaged_bytes(small_mcap, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.mcap"
    path.write_bytes(damaged(small_mcap, data.draw(damage(len(small_mcap)))))
    only_ours(lambda: read_log(path, TOPIC), LOG_BOUND)


# -- ROS bags (rosbags) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["ros2-db3", "ros1-bag"])
def small_bag(request, tmp_path_factory):
    """``(path, the file to damage, its bytes)``: a rosbag2 folder's .db3 or a ROS 1 .bag of six frames."""
    pytest.importorskip("rosbags", reason="the optional rosbags package (extra [rosbags], installed by make test)")
    from test_mcap import raw_image, write_bag
    ros1 = request.param
    path = tmp_path_factory.mktemp("fuzz_bag") / ("small.bag" if ros1 else "small")
    write_bag(path, ros1, [(TOPIC, "sensor_msgs/msg/Image", raw_image(f, i * 0.1, "front"))
                           for i, f in enumerate(make_noise_clip(6, H, W, seed=3))])
    target = path if ros1 else next(path.glob("*.db3"))
    read_log(path, TOPIC)
    return path, target, target.read_bytes()


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_rosbag_readers_damaged_bytes(small_bag, data):
    path, target, original = small_bag
    target.write_bytes(damaged(original, data.draw(damage(len(original)))))
    try:
        only_ours(lambda: read_log(path, TOPIC), LOG_BOUND)
    finally:
        target.write_bytes(original)
