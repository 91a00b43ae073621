"""The streaming runtime: parity with the official golden (set A) and with ``TMANet.predict_clip`` for the ORT
and torch backends, stream handling (push_batch, resets, timestamps, bad input), slide mode, zero-copy
binding of the ring into the ORT head, and the backend registry."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import max_abs, top2_margin
from tmanet.model import FrameResult
from tmanet.runtime import StreamingSegmenter
from tmanet.runtime.backends import BACKENDS, BackendUnavailable, get_backend, register_backend
from tmanet.runtime.backends.ort import OrtBackend
from tmanet.model.slide import default_stride
from tmanet.test_clips import make_noise_clip

ATOL = 1e-3          # set A: float32 tolerance recommended by the reference (rtol 0)
MASK_MARGIN = 2e-3   # set A: masks must agree where the golden top-2 margin is at least this
TINY_ATOL = 1e-4     # tiny model (logit std ~2.4): ORT/torch vs the unsplit model, measured ~1e-6
H, W = 64, 128       # export size of the tiny models


@pytest.fixture(scope="module")
def export_b2(tiny_export_dir):
    return tiny_export_dir(batch=2)


@pytest.fixture(scope="module")
def export_dyn(tiny_export_dir):
    return tiny_export_dir(dynamic=True)


@pytest.fixture(scope="module")
def tiny_model(export_b1):
    from tmanet.checkpoints import load_model
    return load_model(export_b1.parent / "tiny.pth")


@pytest.fixture(scope="module")
def clips():
    """Three different 6-frame clips at the export size."""
    return [make_noise_clip(6, H, W, seed) for seed in (11, 12, 13)]


def stream_logits(model, clip):
    return np.stack([r.logits for r in model.stream(clip)])


# -- parity with the official golden (set A, R50 cityscapes) -----------------------------------------------
@pytest.fixture(scope="module")
def set_a_export(tmp_path_factory, official_model, official_cityscapes_ckpt):
    from tmanet.export import export_onnx
    return export_onnx(official_model, tmp_path_factory.mktemp("setA_export"), 64, 128,
                       checkpoint=official_cityscapes_ckpt, check=False)


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_set_a_golden_parity(set_a_export, set_a, backend):
    seg = StreamingSegmenter.open(set_a_export, backend=backend, return_logits=True)
    results = [seg.push(frame) for frame in set_a["clip"]]  # streamed from frame 0: 0 and 1 are warm-up
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    for k, frame in enumerate((2, 3, 4)):
        got, golden = results[frame], set_a["logits"][k]
        err = max_abs(got.logits, golden)
        assert err <= ATOL, f"{backend} frame {frame}: logits max |d| {err:.3g} > {ATOL}"
        # The wrong (newest-first) memory order is far away: the check can tell them apart.
        assert max_abs(got.logits, set_a["diagnostic"][k]) > 100 * ATOL
        sure = top2_margin(golden) >= MASK_MARGIN
        assert np.array_equal(got.mask[sure], set_a["masks"][k][sure]), f"{backend} frame {frame}: masks differ"
        assert got.mask.dtype == np.uint8 and got.logits.dtype == np.float32


# -- whole mode against the reference model ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_whole_matches_predict_clip_and_warm_up(export_b1, tiny_model, clips, backend):
    clip = clips[0]
    seg = StreamingSegmenter.open(export_b1, backend=backend, return_logits=True)
    results = [seg.push(f) for f in clip]
    assert all(isinstance(r, FrameResult) for r in results)
    got = np.stack([r.logits for r in results])
    T = tiny_model.config.memory_frames
    assert max_abs(got[T:], tiny_model.predict_clip(clip)) <= TINY_ATOL
    assert max_abs(got, stream_logits(tiny_model, clip)) <= TINY_ATOL  # warm-up frames: first frame copied
    for r in results:
        assert r.mask.shape == (H, W) and np.array_equal(r.mask, r.logits.argmax(0))
    assert [r.stream for r in results] == [0] * len(clip) and results[0].timestamp is None


def test_logits_only_on_request(export_b1, clips):
    seg = StreamingSegmenter.open(export_b1)
    res = seg.push(clips[0][0])
    assert res.logits is None and res.mask.shape == (H, W)


def test_results_are_not_overwritten_by_later_frames(export_b1, clips):
    seg = StreamingSegmenter.open(export_b1, return_logits=True)
    first = seg.push(clips[0][0])
    kept = first.mask.copy(), first.logits.copy()
    seg.push(clips[1][0])
    assert np.array_equal(first.mask, kept[0]) and np.array_equal(first.logits, kept[1])


# -- batches of streams ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fixed2", "dynamic"])
def test_push_batch_equals_separate_streams(export_b1, export_b2, export_dyn, clips, which):
    directory = export_b2 if which == "fixed2" else export_dyn
    seg = StreamingSegmenter.open(directory, return_logits=True)
    singles = [StreamingSegmenter.open(export_b1, return_logits=True) for _ in range(2)]
    for t in range(len(clips[0])):
        batch = seg.push_batch(np.stack([clips[0][t], clips[1][t]]))
        assert [r.stream for r in batch] == [0, 1] and [r.index for r in batch] == [t, t]
        for s in range(2):
            alone = singles[s].push(clips[s][t])
            assert max_abs(batch[s].logits, alone.logits) <= TINY_ATOL
            assert np.array_equal(batch[s].mask, alone.mask) or \
                np.all(top2_margin(alone.logits)[batch[s].mask != alone.mask] < 1e-4)


def test_dynamic_batch_any_stream_count_fixed_until_reset(export_dyn, tiny_model, clips):
    seg = StreamingSegmenter.open(export_dyn, return_logits=True)
    out = [seg.push_batch(np.stack([c[t] for c in clips])) for t in range(len(clips[0]))]
    for s, clip in enumerate(clips):
        assert max_abs(np.stack([o[s].logits for o in out]), stream_logits(tiny_model, clip)) <= TINY_ATOL
    with pytest.raises(ValueError, match="3 streams"):
        seg.push_batch(np.stack([clips[0][0], clips[1][0]]))
    seg.reset()
    two = seg.push_batch(np.stack([clips[2][0], clips[0][0]]))  # a new stream count after reset()
    assert len(two) == 2 and two[0].index == 0


def test_dynamic_export_records_max_batch_and_the_runtime_chunks_by_it(export_dyn, tiny_model, clips, tmp_path):
    import json
    import shutil
    assert json.loads((export_dyn / "manifest.json").read_text())["max_batch"] == 64
    small = tmp_path / "dyn2"
    shutil.copytree(export_dyn, small)
    m = json.loads((small / "manifest.json").read_text())
    m["max_batch"] = 2  # as if exported for at most 2
    (small / "manifest.json").write_text(json.dumps(m))
    seg = StreamingSegmenter.open(small, return_logits=True)
    out = [seg.push_batch(np.stack([c[t] for c in clips])) for t in range(len(clips[0]))]
    assert [len(rows) for rows in seg.last_calls] == [2, 1]  # 3 streams: engine batches of at most 2
    for s, clip in enumerate(clips):
        assert max_abs(np.stack([o[s].logits for o in out]), stream_logits(tiny_model, clip)) <= TINY_ATOL


def test_fixed_batch_pads_partial_calls_with_idle_rows(export_b1, export_b2, clips):
    """A fixed batch of 2 runs any number of streams: a partial engine call is padded with ring rows of no
    stream, and the results equal a batch-1 export's."""
    one = StreamingSegmenter.open(export_b1, return_logits=True)
    two = StreamingSegmenter.open(export_b2, return_logits=True)
    for f in clips[0][:3]:
        assert max_abs(two.push(f).logits, one.push(f).logits) <= TINY_ATOL
    assert two.last_calls == [[0, 1]] and two.ring.batch == 2  # stream 0 + one idle row
    three = StreamingSegmenter.open(export_b2, return_logits=True)
    out = [three.push_batch(np.stack([c[t] for c in clips])) for t in range(2)]
    assert three.last_calls == [[0, 1], [2, 3]] and three.ring.batch == 4
    single = StreamingSegmenter.open(export_b1, return_logits=True)
    assert max_abs(out[1][2].logits, [single.push(f) for f in clips[2][:2]][1].logits) <= TINY_ATOL


def test_push_and_push_batch_address_the_same_streams(export_dyn, clips):
    seg = StreamingSegmenter.open(export_dyn)
    seg.push(clips[0][0])
    assert seg.push_batch(clips[0][1:2])[0].index == 1  # the single stream, either way
    assert seg.push(clips[0][2], stream=0).index == 2
    many = StreamingSegmenter.open(export_dyn, num_streams=2)
    with pytest.raises(ValueError, match="name the streams"):
        many.push(clips[0][0])
    assert many.push(clips[0][0], stream=1).stream == 1


# -- resets and timestamps ---------------------------------------------------------------------------------
def test_reset_one_stream(export_b2, tiny_model, clips):
    a, b = clips[0], clips[1]
    seg = StreamingSegmenter.open(export_b2, return_logits=True)
    out = [seg.push_batch(np.stack([a[t], b[t]])) for t in range(3)]
    seg.reset(1)
    out += [seg.push_batch(np.stack([a[t], b[t]])) for t in range(3, 6)]
    # Stream 0 never noticed; stream 1 restarted at frame 3, whose result is a first frame's.
    assert max_abs(np.stack([o[0].logits for o in out]), stream_logits(tiny_model, a)) <= TINY_ATOL
    assert max_abs(np.stack([o[1].logits for o in out[3:]]), stream_logits(tiny_model, b[3:])) <= TINY_ATOL
    assert [o[1].index for o in out] == [0, 1, 2, 0, 1, 2] and [o[0].index for o in out] == list(range(6))
    # Restarting really changes the result (the memory matters for this model).
    assert max_abs(out[4][1].logits, stream_logits(tiny_model, b)[4]) > 100 * TINY_ATOL
    with pytest.raises(ValueError, match="out of range"):
        seg.reset(2)


def test_timestamp_gap_resets_the_stream(export_b1, tiny_model, clips):
    clip = clips[0]
    seg = StreamingSegmenter.open(export_b1, return_logits=True, max_gap=0.5)
    times = [0.0, 0.04, 0.08, 2.0, 2.04, 2.08]  # a 1.9 s gap before frame 3
    out = [seg.push(f, timestamp=t) for f, t in zip(clip, times)]
    assert [r.index for r in out] == [0, 1, 2, 0, 1, 2] and out[3].timestamp == 2.0
    expected = np.concatenate([stream_logits(tiny_model, clip[:3]), stream_logits(tiny_model, clip[3:])])
    assert max_abs(np.stack([r.logits for r in out]), expected) <= TINY_ATOL
    # Time going backwards (a restarted source) is a discontinuity too; max_gap=None never resets.
    assert seg.push(clip[0], timestamp=1.0).index == 0
    keep = StreamingSegmenter.open(export_b1, max_gap=None)
    assert [keep.push(f, timestamp=t).index for f, t in zip(clip, times)] == list(range(6))


def test_batch_timestamps_reset_only_the_stream_with_a_gap(export_b2, clips):
    seg = StreamingSegmenter.open(export_b2)
    seg.push_batch(np.stack([clips[0][0], clips[1][0]]), timestamps=0.0)          # one for all
    res = seg.push_batch(np.stack([clips[0][1], clips[1][1]]), timestamps=[0.04, 3.0])
    assert [r.index for r in res] == [1, 0]


# -- bad input leaves the state untouched ------------------------------------------------------------------
def test_bad_frames_leave_state_untouched(export_b1, clips):
    clip = clips[0]
    ref = StreamingSegmenter.open(export_b1, return_logits=True, max_gap=None)
    expected = [ref.push(f, timestamp=0.1 * t) for t, f in enumerate(clip)]
    seg = StreamingSegmenter.open(export_b1, return_logits=True, max_gap=None)
    got = [seg.push(clip[0], timestamp=0.0), seg.push(clip[1], timestamp=0.1)]
    bad = [
        (clip[2].astype(np.float32), {}, "uint8"),
        (clip[2][..., :2], {}, "shape"),
        (clip[2][:32], {}, "differs from the export size"),
        (np.zeros((80, 160, 3), np.uint8), {}, "slide"),     # larger: the message suggests slide mode
        (clip[:2], {}, "shape"),                              # a batch through push()
        (clip[2], {"timestamp": float("nan")}, "finite"),
        (clip[2], {"timestamp": "soon"}, "number"),
    ]
    for frame, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            seg.push(frame, **kwargs)
    with pytest.raises(ValueError, match="serves 1 streams"):
        seg.push_batch(clip[2:4])
    with pytest.raises(ValueError, match="out of range"):
        seg.push(clip[2], stream=1)
    got += [seg.push(f, timestamp=0.1 * t) for t, f in enumerate(clip[2:], start=2)]
    for g, e in zip(got, expected):
        assert g.index == e.index and np.array_equal(g.logits, e.logits) and np.array_equal(g.mask, e.mask)


def test_bad_batch_leaves_state_untouched(export_b2, clips):
    frames = np.stack([clips[0], clips[1]], 1)  # (F, 2, H, W, 3)
    ref = StreamingSegmenter.open(export_b2, return_logits=True)
    expected = [ref.push_batch(f) for f in frames]
    seg = StreamingSegmenter.open(export_b2, return_logits=True)
    got = [seg.push_batch(frames[0])]
    for bad, kwargs, message in [(frames[1][:1], {}, "2 streams"), (frames[1][:, :32], {}, "export size"),
                                 (frames[1], {"timestamps": [0.0]}, "1 timestamps for 2 frames")]:
        with pytest.raises(ValueError, match=message):
            seg.push_batch(bad, **kwargs)
    got += [seg.push_batch(f) for f in frames[1:]]
    for g, e in zip(got, expected):
        for s in range(2):
            assert np.array_equal(g[s].logits, e[s].logits)


# -- property test: any sequence of pushes, resets, gaps and bad input -------------------------------------
class ReferenceStreams:
    """What each stream's result must be, from the torch split and the slot rule alone (no ring)."""

    def __init__(self, model, pool):
        self.encoder, self.head = model.split((H, W))
        self.T = model.config.memory_frames
        with torch.no_grad():
            self.enc = [self.encoder(torch.from_numpy(f[None])) for f in pool]
        self.cache = {}

    def logits(self, history):
        from tmanet.slots import memory_frame_indices
        t = len(history) - 1
        ids = tuple(history[i] for i in memory_frame_indices(t, 0, self.T))
        key = (history[-1], ids)
        if key not in self.cache:
            cur = self.enc[history[-1]]
            keys = [self.enc[j][2][:, i] for i, j in enumerate(ids)]
            values = [self.enc[j][3][:, i] for i, j in enumerate(ids)]
            with torch.no_grad():
                self.cache[key] = self.head(cur[0], cur[1], *keys, *values)[1][0].numpy()
        return self.cache[key]


@pytest.fixture(scope="module")
def reference_streams(tiny_model):
    pool = [make_noise_clip(1, H, W, seed)[0] for seed in (21, 22, 23)]
    return pool, ReferenceStreams(tiny_model, pool)


OPS = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 2), st.integers(0, 2), st.booleans(), st.booleans()),
    st.tuples(st.just("reset"), st.integers(0, 1)),
    st.tuples(st.just("bad"), st.sampled_from(["dtype", "size", "count", "timestamp"])),
), min_size=1, max_size=8)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_stream_handling_property(export_b2, reference_streams, ops):
    pool, ref = reference_streams
    seg = StreamingSegmenter.open(export_b2, return_logits=True, max_gap=1.0, num_streams=2)
    history = [[], []]
    clock = [0.0, 0.0]
    for op in ops:
        if op[0] == "push":
            _, a, b, gap_a, gap_b = op
            stamps = []
            for s, gap in enumerate((gap_a, gap_b)):
                clock[s] += 5.0 if gap else 0.04
                if gap:
                    history[s] = []
                stamps.append(clock[s])
            history[0].append(a)
            history[1].append(b)
            res = seg.push_batch(np.stack([pool[a], pool[b]]), timestamps=stamps)
            for s in range(2):
                assert res[s].index == len(history[s]) - 1
                assert max_abs(res[s].logits, ref.logits(history[s])) <= TINY_ATOL, (op, history)
        elif op[0] == "reset":
            seg.reset(op[1])
            history[op[1]] = []
        else:
            bad = {"dtype": (np.stack([pool[0], pool[1]]).astype(np.int16), None),
                   "size": (np.stack([pool[0], pool[1]])[:, :, :64], None),
                   "count": (pool[0][None], None),
                   "timestamp": (np.stack([pool[0], pool[1]]), [0.0, float("inf")])}[op[1]]
            with pytest.raises(ValueError):
                seg.push_batch(bad[0], timestamps=bad[1])


# -- slide mode --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_slide_matches_predict_clip(export_b1, tiny_model, backend):
    clip = make_noise_clip(3, 80, 160, seed=5)  # larger than the export: 2 x 2 overlapping 64x128 windows
    stride = (16, 32)
    seg = StreamingSegmenter.open(export_b1, backend=backend, mode="slide", stride=stride, return_logits=True)
    out = [seg.push(f) for f in clip]
    assert seg.windows == [(0, 64, 0, 128), (0, 64, 32, 160), (16, 80, 0, 128), (16, 80, 32, 160)]
    assert len(seg.last_calls) == 4  # batch-1 export: one window per engine call, each its own ring row
    T = tiny_model.config.memory_frames
    expected = tiny_model.predict_clip(clip, mode="slide", crop=(H, W), stride=stride)
    got = np.stack([r.logits for r in out[T:]])
    assert got.shape == expected.shape == (len(clip) - T, 19, 80, 160)
    assert max_abs(got, expected) <= TINY_ATOL
    for r, e in zip(out[T:], expected):
        sure = top2_margin(e) >= 1e-3
        assert np.array_equal(r.mask[sure], e.argmax(0)[sure])


def test_slide_batches_windows_and_streams(export_b2, export_dyn, tiny_model):
    clips = [make_noise_clip(3, 64, 200, seed=6), make_noise_clip(3, 64, 200, seed=8)]  # 3 windows per frame
    stride = (64, 64)
    T = tiny_model.config.memory_frames
    expected = [tiny_model.predict_clip(c, mode="slide", crop=(H, W), stride=stride)[0] for c in clips]
    for directory, chunks in ((export_b2, 3), (export_dyn, 1)):  # 6 lanes: 3 chunks of 2, or one of 6
        seg = StreamingSegmenter.open(directory, mode="slide", stride=stride, return_logits=True)
        out = [seg.push_batch(np.stack([clips[0][t], clips[1][t]])) for t in range(T + 1)]
        assert len(seg.last_calls) == chunks
        for s in range(2):
            assert max_abs(out[T][s].logits, expected[s]) <= TINY_ATOL
    # Idle lanes of a fixed-batch export: push() of one stream, 3 windows in chunks of 2 (half the last
    # chunk idle). Whole mode keeps the strict rule (push() needs a batch-1 export): see test_fixed_batch_rules.
    seg = StreamingSegmenter.open(export_b2, mode="slide", stride=stride, return_logits=True)
    out = [seg.push(f) for f in clips[0]]
    assert seg.last_calls == [[0, 1], [2, 3]]  # row 3 is idle
    assert max_abs(out[T].logits, expected[0]) <= TINY_ATOL


def test_slide_input_rules(export_b1, clips):
    seg = StreamingSegmenter.open(export_b1, mode="slide")
    with pytest.raises(ValueError, match="smaller than the export size"):
        seg.push(np.zeros((48, 200, 3), np.uint8))
    seg.push(np.zeros((80, 160, 3), np.uint8))
    with pytest.raises(ValueError, match="differs from this segmenter"):
        seg.push(np.zeros((96, 160, 3), np.uint8))
    with pytest.raises(ValueError, match="at most the crop"):
        StreamingSegmenter.open(export_b1, mode="slide", stride=(65, 10))
    with pytest.raises(ValueError, match="mode"):
        StreamingSegmenter.open(export_b1, mode="tiles")


def test_default_stride():
    assert default_stride((769, 769), (769, 769), (513, 513)) == (513, 513)  # the official protocol
    assert default_stride((640, 640), (640, 640), (512, 512)) == (512, 512)
    assert default_stride((256, 512), (769, 769), (513, 513)) == (171, 342)  # same overlap ratio


# -- zero copy: the ORT head reads the ring's memory by address --------------------------------------------
def test_ort_head_reads_the_ring_in_place(export_b1, clips):
    import onnxruntime as ort
    seg = StreamingSegmenter.open(export_b1, return_logits=True)
    for f in clips[0][:3]:
        last = seg.push(f)
    backend, ring = seg.backend, seg.ring
    binding = backend.last_head_binding
    # Re-running the bound head (no arrays passed) gives the frame's result: it reads the same memory.
    backend.memory_head.run_with_iobinding(binding)
    mask, logits = binding.copy_outputs_to_cpu()
    assert np.array_equal(logits[0], last.logits)
    # Change the ring in place: the bound head sees it without being given anything.
    ring.values *= 0.5
    ring.keys += 0.25
    backend.memory_head.run_with_iobinding(binding)
    _, changed = binding.copy_outputs_to_cpu()
    assert max_abs(changed[0], last.logits) > 1e-2
    # ... and it is exactly what a plain (copying) run on the ring's current slot contents gives.
    from tmanet.slots import ring_positions
    _, read = ring_positions(ring.clock[0] - 1, ring.memory_frames)
    feeds = {"query_key": backend._outputs("encoder", 1)["query_key"].copy(),
             "query_value": backend._outputs("encoder", 1)["query_value"].copy()}
    for i, p in enumerate(read):
        feeds[f"memory_key_{i}"] = ring.keys[p, i].copy()
        feeds[f"memory_value_{i}"] = ring.values[p, i].copy()
    plain = ort.InferenceSession(str(export_b1 / "memory_head.onnx"), providers=["CPUExecutionProvider"])
    assert max_abs(plain.run(["logits"], feeds)[0], changed) <= 1e-5
    # The slot views handed to the head are the ring's own memory, contiguous, not copies.
    for view in ring.slot_keys() + ring.slot_values():
        assert view.flags.c_contiguous
        assert np.shares_memory(view, ring.keys) or np.shares_memory(view, ring.values)



def test_ort_sessions_do_not_spin(export_b1):
    """The frame engine's and the head's thread pools alternate: neither may busy-wait between its runs
    (docs/CPU.md), and the thread count asked for reaches both sessions."""
    from tmanet.onnx_session import NO_SPINNING
    seg = StreamingSegmenter.open(export_b1, threads=1)
    for session in (seg.backend.encoder, seg.backend.memory_head):
        options = session.get_session_options()
        assert {k: options.get_session_config_entry(k) for k in NO_SPINNING} == NO_SPINNING == {
            "session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
        assert options.intra_op_num_threads == 1 and options.use_per_session_threads
    seg.close()


def test_ort_bindings_are_made_once_per_ring_phase(export_b1, clips):
    """The head's IOBindings are keyed by the slot addresses: T+1 ring phases, then only reuse."""
    seg = StreamingSegmenter.open(export_b1)
    T = seg.spec.memory_frames
    frames = np.concatenate(clips)
    made = []
    for f in frames[:T + 1]:
        seg.push(f)
        made.append(seg.backend.last_head_binding)
    assert len({id(b) for b in made}) == T + 1
    for k, f in enumerate(frames[T + 1:2 * T + 2]):
        seg.push(f)
        assert seg.backend.last_head_binding is made[k]  # same phase, same addresses: the same binding


def test_address_keyed_cache_makes_once_and_starts_over_when_full():
    from tmanet.runtime.address_cache import AddressKeyedCache
    cache, calls = AddressKeyedCache(max_entries=3), []

    def make(key):
        return lambda: calls.append(key) or f"entry {key}"
    assert [cache.get_or_make(k, make(k)) for k in (1, 2, 1, 3, 2)] == ["entry 1", "entry 2", "entry 1", "entry 3",
                                                                        "entry 2"]
    assert calls == [1, 2, 3] and len(cache) == 3
    cache.get_or_make(4, make(4))  # full: stale addresses are dropped, the new entry kept
    assert len(cache) == 1 and cache.get(4) == "entry 4" and cache.get(1) is None

# -- backends: registry, errors ----------------------------------------------------------------------------
def test_trt_backend_reports_clearly_when_unavailable(export_b1):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        StreamingSegmenter.open(export_b1, backend="trt")
    with pytest.raises(ValueError, match="unknown backend 'nope'.*ort.*torch.*trt"):
        get_backend("nope")


def test_a_new_backend_is_one_registered_class(export_b1, clips):
    calls = []

    class CountingBackend(OrtBackend):
        name = "counting"

        def head(self, *args, **kwargs):
            calls.append(args[0].shape)
            return super().head(*args, **kwargs)

    register_backend("counting", CountingBackend)
    try:
        seg = StreamingSegmenter.open(export_b1, backend="counting")
        seg.push(clips[0][0])
        assert calls == [(1, 16, 8, 16)]
    finally:
        BACKENDS.pop("counting")


def test_ort_backend_is_cpu_only(export_b1):
    with pytest.raises(BackendUnavailable, match="CPU only"):
        StreamingSegmenter.open(export_b1, backend="ort", device="cuda")


def test_runtime_package_import_is_light():
    code = ("import sys, tmanet.runtime as r; assert 'onnxruntime' not in sys.modules; "
            "S = r.StreamingSegmenter; assert 'onnxruntime' not in sys.modules; print(S.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "StreamingSegmenter"


# -- torch backend options: half precision, channels_last, compile; CUDA graphs, cudnn.benchmark (CUDA) ----
@pytest.mark.parametrize("options, message", [
    ({"cudnn_benchmark": True}, "cudnn_benchmark needs device='cuda'"),
    ({"cuda_graphs": True}, "cuda_graphs needs device='cuda'"),
    ({"fused_attention": True}, "fused_attention needs device='cuda'"),
    ({"precision": "bf16"}, "precision must be one of fp32, fp16"),
])
def test_torch_cuda_options_are_rejected_on_cpu(export_b1, options, message):
    with pytest.raises(ValueError, match=message):
        StreamingSegmenter.open(export_b1, backend="torch", device="cpu", **options)


def test_cli_cudnn_benchmark_needs_cuda(export_b1, capsys):
    from tmanet.cli import main
    assert main(["bench", str(export_b1), "--frames", "1", "--backend", "torch", "--cudnn-benchmark",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cudnn_benchmark needs device='cuda'" in err


def test_torch_describe_records_precision_and_graphs(export_b1):
    seg = StreamingSegmenter.open(export_b1, backend="torch")
    assert "fp32" in seg.backend.describe() and "CUDA graphs off" in seg.backend.describe()
    assert "fused attention off" in seg.backend.describe() and not seg.backend.memory_head.fused_attention


@pytest.mark.parametrize("flags, message", [(["--precision", "fp16"], "--precision applies to the openvino and torch backends only"),
                                            (["--cuda-graphs"], "--cuda-graphs needs a CUDA backend"),
                                            (["--no-fused-attention"], "--no-fused-attention applies to the torch"),
                                            (["--channels-last"], "--channels-last applies to the torch backend"),
                                            (["--cudnn-benchmark"], "--cudnn-benchmark applies to the torch"),
                                            (["--compile"], "--compile applies to the torch backend")])
def test_cli_rejects_torch_cuda_flags_with_ort(export_b1, tmp_path, capsys, flags, message):
    from tmanet.cli import main
    clip = tmp_path / "clip.npy"
    np.save(clip, make_noise_clip(2, H, W, 3))
    for cmd in (["run", str(export_b1), "--input", str(clip), "--backend", "ort"],
                ["bench", str(export_b1), "--frames", "1", "--backend", "ort"]):
        assert main(cmd + flags + ["--no-progress"]) == 2
        assert message in capsys.readouterr().err


def torch_stream(export_dir, clip, device="cpu", **options):
    seg = StreamingSegmenter.open(export_dir, backend="torch", device=device, return_logits=True, **options)
    try:
        return [seg.push(f) for f in clip]
    finally:
        seg.close()


def gpu_stream(export_dir, clip, **options):
    return torch_stream(export_dir, clip, "cuda", **options)


@pytest.fixture(scope="module")
def long_clip():
    return make_noise_clip(2 * 2 + 2, H, W, 21)  # 2T+2 frames for T=2: every ring phase, twice over


def assert_close_to_fp32(fp32, got, precision):
    """fp32: logits within TINY_ATOL and equal masks where the top-2 margin is clear; fp16: masks equal on at
    least 99 % of the pixels (the fp16 tolerance of these tests)."""
    for a, b in zip(fp32, got):
        assert b.logits.dtype == np.float32 and b.mask.dtype == np.uint8
        if precision == "fp32":
            assert max_abs(a.logits, b.logits) <= TINY_ATOL
            sure = top2_margin(a.logits) >= MASK_MARGIN
            assert np.array_equal(a.mask[sure], b.mask[sure])
        else:
            assert np.mean(a.mask == b.mask) >= 0.99


@pytest.fixture(scope="module")
def cpu_fp32(export_b1, long_clip):
    return torch_stream(export_b1, long_clip)


def test_torch_compile_on_cpu_equals_eager_fp32(export_b1, long_clip, cpu_fp32):
    """torch.compile (Inductor, C++ on the CPU): ~1 minute to compile the two tiny graphs here."""
    import os
    import shutil
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++, or $CXX)")
    seg = StreamingSegmenter.open(export_b1, backend="torch", return_logits=True, compile=True)
    got = [seg.push(f) for f in long_clip]
    assert "torch.compile" in seg.backend.describe()
    assert_close_to_fp32(cpu_fp32, got, "fp32")


@pytest.mark.parametrize("options", [{"precision": "fp16"}, {"channels_last": True},
                                     {"precision": "fp16", "channels_last": True}])
def test_torch_speed_options_on_cpu_equal_eager_fp32(export_b1, long_clip, cpu_fp32, options):
    """The options that exist on the CPU: true half weights and activations (ring included), NHWC layout."""
    got = torch_stream(export_b1, long_clip, **options)
    assert_close_to_fp32(cpu_fp32, got, options.get("precision", "fp32"))
    seg = StreamingSegmenter.open(export_b1, backend="torch", **options)
    seg.push(long_clip[0])
    half = options.get("precision") == "fp16"
    assert next(seg.backend.encoder.parameters()).dtype == (torch.float16 if half else torch.float32)
    assert seg.ring.keys.dtype == seg.ring.values.dtype == (torch.float16 if half else torch.float32)
    if options.get("channels_last"):
        conv = seg.backend.encoder.reduce.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and "channels_last" in seg.backend.describe()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_torch_cuda_fp32_matches_ort_cpu(export_b1, long_clip, fused):
    ort_seg = StreamingSegmenter.open(export_b1, backend="ort", return_logits=True)
    want = [ort_seg.push(f) for f in long_clip]
    seg = StreamingSegmenter.open(export_b1, backend="torch", device="cuda", fused_attention=fused)
    assert seg.backend.memory_head.fused_attention is fused  # the GPU has a fused kernel for these widths
    assert f"fused attention {'on' if fused else 'off'}" in seg.backend.describe()
    got = gpu_stream(export_b1, long_clip, precision="fp32", fused_attention=fused)
    assert max_abs([r.logits for r in got], [r.logits for r in want]) <= 1e-3
    for g, w in zip(got, want):
        assert g.logits.dtype == np.float32 and g.mask.dtype == np.uint8
        sure = top2_margin(w.logits) >= MASK_MARGIN
        assert np.array_equal(g.mask[sure], w.mask[sure])


@pytest.mark.gpu
def test_torch_cuda_fp16_agrees_with_fp32(export_b1, long_clip):
    fp32 = gpu_stream(export_b1, long_clip)
    assert_close_to_fp32(fp32, gpu_stream(export_b1, long_clip, precision="fp16"), "fp16")
    seg = StreamingSegmenter.open(export_b1, backend="torch", device="cuda", precision="fp16")
    seg.push(long_clip[0])
    assert seg.ring.keys.dtype == torch.float16 and seg.ring.values.dtype == torch.float16
    assert "fp16" in seg.backend.describe()


@pytest.mark.gpu
@pytest.mark.parametrize("options", [
    {"precision": "fp16", "channels_last": True, "cudnn_benchmark": True, "cuda_graphs": True},
    {"channels_last": True, "cudnn_benchmark": True},
    {"precision": "fp16", "channels_last": True, "compile": True, "cuda_graphs": True},
])
def test_torch_cuda_speed_options_equal_eager_fp32(export_b1, long_clip, options, monkeypatch):
    import importlib.util
    if options.get("compile") and importlib.util.find_spec("triton") is None:
        pytest.skip("torch.compile on CUDA needs Triton, which this torch installation lacks")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)   # process-wide: restored after the test
    fp32 = gpu_stream(export_b1, long_clip)
    got = gpu_stream(export_b1, long_clip, **options)
    # cudnn.benchmark may pick TF32-free but differently ordered kernels: the fp32 bound is the fp32 one.
    assert_close_to_fp32(fp32, got, options.get("precision", "fp32"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_graphs_match_eager(export_b1, long_clip, precision):
    eager = gpu_stream(export_b1, long_clip, precision=precision)
    seg = StreamingSegmenter.open(export_b1, backend="torch", device="cuda", return_logits=True,
                                  precision=precision, cuda_graphs=True)
    graphed = [seg.push(f) for f in long_clip]
    assert "CUDA graphs on" in seg.backend.describe()
    T = 2
    assert len(seg.backend._head_graphs) == T + 1  # one head graph per ring phase, then only replays
    # The same kernels replayed: equal up to reduction-order noise (bitwise equality is typical but
    # cuDNN/cuBLAS do not promise it across capture).
    tol, margin = (1e-5, 1e-3) if precision == "fp32" else (1e-2, 5e-2)
    for a, b in zip(eager, graphed):
        assert max_abs(a.logits, b.logits) <= tol
        sure = top2_margin(a.logits) >= margin
        assert np.array_equal(a.mask[sure], b.mask[sure])
    # A reset stream re-warms the same ring in place: still the captured graphs, still the eager answer.
    seg.reset(0)
    again = seg.push(long_clip[0])
    assert len(seg.backend._head_graphs) == T + 1
    assert max_abs(again.logits, gpu_stream(export_b1, long_clip[:1], precision=precision)[0].logits) <= tol
    seg.close()
