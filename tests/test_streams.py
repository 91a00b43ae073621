"""Independent streams: any subset of a segmenter's streams advances, the others keep their memory and frame
counters. Checked against one dedicated single-stream segmenter per stream fed the same frames."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tmanet.runtime import StreamingSegmenter
from tmanet.test_clips import make_noise_clip

H, W = 64, 128
TINY_ATOL = 1e-4
MASK_MARGIN = 1e-3  # masks must agree where the reference's top-2 margin is at least this (float rounding)


@pytest.fixture(scope="module")
def exports(tiny_export_dir, tmp_path_factory):
    """batch-1 (the references), fixed batch 2 (padding rows) and dynamic with max_batch 2 (chunking)."""
    dyn = tmp_path_factory.mktemp("streams") / "dyn2"
    shutil.copytree(tiny_export_dir(dynamic=True), dyn)
    manifest = json.loads((dyn / "manifest.json").read_text())
    manifest["max_batch"] = 2
    (dyn / "manifest.json").write_text(json.dumps(manifest))
    return {"b1": tiny_export_dir(), "b2": tiny_export_dir(batch=2), "dyn2": dyn}


@pytest.fixture(scope="module")
def pool():
    return [make_noise_clip(1, H, W, seed)[0] for seed in (31, 32, 33)]


def assert_same(got, want):
    assert got.index == want.index
    assert float(np.abs(got.logits - want.logits).max()) <= TINY_ATOL
    part = np.sort(want.logits, axis=0)
    sure = part[-1] - part[-2] >= MASK_MARGIN
    assert np.array_equal(got.mask[sure], want.mask[sure])


PUSH = st.tuples(st.just("push"), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1,
                                           max_size=4))
OPS = st.lists(st.one_of(PUSH, PUSH, st.tuples(st.sampled_from(["reset", "release"]), st.integers(0, 3)),
                         st.tuples(st.just("bad"), st.sampled_from(["range", "duplicate", "bool", "negative"]))),
               min_size=3, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 4), export=st.sampled_from(["b2", "dyn2"]), ops=OPS)
# Diverged clocks in one engine call (stream 1 ran ahead alone), then a restart that rejoins the lockstep.
@example(n=2, export="dyn2", ops=[("push", [(0, 0), (1, 1)]), ("push", [(1, 2)]), ("push", [(0, 1), (1, 0)]),
                                   ("push", [(1, 2), (0, 1)]), ("reset", 0), ("push", [(0, 0), (1, 2)])])
def test_random_subsets_match_dedicated_segmenters(exports, pool, n, export, ops):
    seg = StreamingSegmenter.open(exports[export], return_logits=True, num_streams=n)
    refs = [StreamingSegmenter.open(exports["b1"], return_logits=True) for _ in range(n)]
    for op in ops:
        if op[0] == "push":
            picked = {}
            for s, f in op[1]:
                picked.setdefault(s % n, f)  # distinct ids, in the order drawn
            ids = list(picked)
            res = seg.push_batch(np.stack([pool[picked[s]] for s in ids]), streams=ids)
            assert [r.stream for r in res] == ids
            for s, r in zip(ids, res):
                assert_same(r, refs[s].push(pool[picked[s]]))
        elif op[0] in ("reset", "release"):
            s = op[1] % n
            getattr(seg, op[0])(s)
            refs[s].reset()
            if op[0] == "release" and seg.in_use:
                assert not seg.in_use[s]
        else:
            streams, count = {"range": ([n], 1), "duplicate": ([0, 0], 2), "bool": ([True], 1),
                              "negative": ([-1], 1)}[op[1]]
            with pytest.raises(ValueError, match="out of range|distinct|non-negative int"):
                seg.push_batch(np.stack([pool[0]] * count), streams=streams)
    # Every stream still continues exactly like its reference (bad pushes changed nothing).
    for s in range(n):
        assert_same(seg.push(pool[s % 3], stream=s), refs[s].push(pool[s % 3]))


def test_lockstep_reads_views_and_diverged_streams_gather(exports, pool):
    seg = StreamingSegmenter.open(exports["dyn2"], return_logits=True, num_streams=2)
    seg.push_batch(np.stack(pool[:2]))
    ring = seg.ring
    assert all(np.shares_memory(v, ring.keys) for v in ring.slot_keys([0, 1]))  # lockstep: views
    seg.push(pool[2], stream=1)  # stream 1 moves ahead alone
    assert ring.clock[:2] == [1, 2] and [r.index for r in seg.push_batch(np.stack(pool[:2]))] == [1, 2]
    assert not any(np.shares_memory(v, ring.keys) for v in ring.slot_keys([0, 1]))  # gathered copies
    seg.reset(1)
    seg.push_batch(np.stack(pool[:2]))  # the restarted stream takes the other's clock: views again
    assert ring.clock[0] == ring.clock[1]
    assert all(np.shares_memory(v, ring.keys) for v in ring.slot_keys([0, 1]))


def test_stream_id_rules(exports, pool):
    seg = StreamingSegmenter.open(exports["b1"], num_streams=2)
    with pytest.raises(ValueError, match="3 stream ids for 2 frames"):
        seg.push_batch(np.stack(pool[:2]), streams=[0, 1, 1])
    with pytest.raises(ValueError, match="list of stream ids"):
        seg.push_batch(np.stack(pool[:2]), streams="01")
    with pytest.raises(ValueError, match="out of range"):
        seg.release(2)
    unknown = StreamingSegmenter.open(exports["b1"])
    with pytest.raises(ValueError, match="num_streams"):
        unknown.push_batch(np.stack(pool[:1]), streams=[0])
    with pytest.raises(ValueError, match="num_streams must be"):
        StreamingSegmenter.open(exports["b1"], num_streams=0)
    assert seg.push(pool[0], stream=1).index == 0 and seg.in_use == [False, True]
    seg.reset()  # forgets everything but keeps the stream count open() fixed
    assert seg.streams == 2


@pytest.mark.parametrize("export", ["b1", "b2", "dyn2"])
def test_added_streams_keep_the_others_memory(exports, pool, export):
    """add_stream() grows the ring while streams hold memory: each stream still matches its own reference."""
    seg = StreamingSegmenter.open(exports[export], return_logits=True)
    refs = [StreamingSegmenter.open(exports["b1"], return_logits=True) for _ in range(3)]
    assert seg.add_stream() == 0
    for f in (0, 1, 2):
        assert_same(seg.push(pool[f], stream=0), refs[0].push(pool[f]))
    assert seg.add_stream() == 1 and seg.add_stream() == 2 and seg.streams == 3
    for s, f in [(1, 2), (0, 1), (2, 0), (1, 1)]:
        assert_same(seg.push(pool[f], stream=s), refs[s].push(pool[f]))
    for s, r in zip([2, 0, 1], seg.push_batch(np.stack(pool), streams=[2, 0, 1])):
        assert_same(r, refs[s].push(pool[[2, 0, 1].index(s)]))


def test_sequence_slots_map_sequences_to_streams():
    """The Triton model's bookkeeping: START takes a free stream (again the same one for a held sequence, which
    restarts); a START that finds every stream held is refused ("server full") instead of taking a stream from a
    live sequence; a frame of an unknown sequence is refused."""
    from tmanet.runtime.sequence_slots import SequenceSlots, ServerFull, UnknownSequence
    slots = SequenceSlots(2, idle_timeout_s=60.0, clock=lambda: 0.0)
    assert slots.stream_for("a", start=True) == (0, True)
    assert slots.stream_for(9, start=True) == (1, True)
    assert slots.stream_for("a", start=False) == (0, False)
    assert slots.stream_for("a", start=True) == (0, True)     # START again: the same stream, restarted
    with pytest.raises(ServerFull, match="server full"):
        slots.stream_for("c", start=True)                     # 9 still holds its stream: refused, not taken
    assert slots.stream_for(9, start=False) == (1, False)
    with pytest.raises(UnknownSequence, match="sequence_start"):
        slots.stream_for("c", start=False)
    assert slots.release(9) == 1 and len(slots) == 1
    assert slots.stream_for("c", start=True) == (1, True)