"""The memory-slot rule (pure functions) and the ring buffer every backend shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tmanet.memory import MemoryRing
from tmanet.slots import memory_frame_indices, ring_positions


# -- memory_frame_indices -------------------------------------------------------------------------------
@pytest.mark.parametrize("t, start, T, expected", [
    (0, 0, 1, [0]), (1, 0, 1, [0]), (7, 0, 1, [6]), (7, 7, 1, [7]),
    (0, 0, 2, [0, 0]), (1, 0, 2, [0, 0]), (2, 0, 2, [0, 1]), (3, 0, 2, [1, 2]), (9, 0, 2, [7, 8]),
    (5, 5, 2, [5, 5]), (6, 5, 2, [5, 5]), (7, 5, 2, [5, 6]),
    (0, 0, 4, [0, 0, 0, 0]), (1, 0, 4, [0, 0, 0, 0]), (2, 0, 4, [0, 0, 0, 1]), (3, 0, 4, [0, 0, 1, 2]),
    (4, 0, 4, [0, 1, 2, 3]), (10, 0, 4, [6, 7, 8, 9]), (10, 8, 4, [8, 8, 8, 9]), (12, 8, 4, [8, 9, 10, 11]),
])
def test_memory_frame_indices(t, start, T, expected):
    assert memory_frame_indices(t, start, T) == expected


@pytest.mark.parametrize("T", [1, 2, 4])
def test_memory_frame_indices_oldest_first_and_clamped(T):
    for start in (0, 3):
        for t in range(start, start + 3 * T):
            idx = memory_frame_indices(t, start, T)
            assert len(idx) == T
            assert idx == sorted(idx)                      # oldest first
            assert all(start <= i <= max(t - 1, start) for i in idx)  # never the future, never before start
            if t > start:
                assert idx[-1] == t - 1                    # the last slot is the frame just before t
            if t - T >= start:
                assert idx == list(range(t - T, t))        # no clamping once warmed up


def test_memory_frame_indices_rejects_frame_before_start():
    with pytest.raises(ValueError, match="precedes"):
        memory_frame_indices(2, 3, 2)


# -- ring_positions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 4])
def test_ring_positions_read_the_previous_T_frames(T):
    """Simulate the ring: the position written at frame t is not read at t, and each slot i reads the
    position that frame t-T+i was written to."""
    held = {}  # position -> frame written there last
    for t in range(5 * (T + 1)):
        write, reads = ring_positions(t, T)
        assert 0 <= write <= T and len(reads) == T
        assert write not in reads and len(set(reads)) == T
        held[write] = t
        if t >= T:
            assert [held[p] for p in reads] == [t - T + i for i in range(T)]


def test_ring_positions_examples():
    assert ring_positions(0, 2) == (0, [1, 2])
    assert ring_positions(4, 2) == (1, [2, 0])
    assert ring_positions(3, 1) == (1, [0])
    assert ring_positions(9, 4) == (4, [0, 1, 2, 3])


# -- MemoryRing against a plain reference model ---------------------------------------------------------
KEY_SHAPE, VALUE_SHAPE = (2, 1, 3), (3, 2, 1)


def encodings(t: int, batch: int, T: int, xp: str):
    """Frame t's memory key/value [B, T, C, h, w]: stream b, slot i filled with a recognisable number
    (frame id * 10 + slot; values negated), so any mix-up of frame, stream or slot shows."""
    fid = np.arange(batch)[:, None] + t * batch                   # unique per (stream, frame)
    code = (fid * 10 + np.arange(T)[None, :]).astype(np.float32)  # B, T
    mk = np.broadcast_to(code[:, :, None, None, None], (batch, T, *KEY_SHAPE)).copy()
    mv = -np.broadcast_to(code[:, :, None, None, None], (batch, T, *VALUE_SHAPE)).copy()
    if xp == "torch":
        return torch.from_numpy(mk), torch.from_numpy(mv)
    return mk, mv


def to_numpy(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


ops = st.lists(st.one_of(st.just(("push",)),
                         st.tuples(st.just("reset"), st.one_of(st.none(), st.integers(0, 2)))),
               min_size=1, max_size=30)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 4), batch=st.integers(1, 3), ops=ops)
def test_memory_ring_matches_reference(xp, T, batch, ops):
    ring = None
    start = [0] * batch  # the first frame of each stream, global frame numbering
    t = 0
    for op in ops:
        if op[0] == "reset":
            stream = op[1]
            if stream is not None and stream >= batch:
                continue
            for b in range(batch) if stream is None else [stream]:
                start[b] = t  # the stream's next frame is its first
            if ring is not None:
                ring.reset(stream)
            continue
        mk, mv = encodings(t, batch, T, xp)
        if ring is None:
            ring = MemoryRing.like(mk, mv)
            assert (ring.memory_frames, ring.batch) == (T, batch)
        ring.write(mk, mv)
        keys, values = ring.slot_keys(), ring.slot_values()
        assert len(keys) == len(values) == T
        for b in range(batch):
            frames = memory_frame_indices(t, start[b], T)
            for i, f in enumerate(frames):
                want_k, want_v = encodings(f, batch, T, "numpy")
                np.testing.assert_array_equal(to_numpy(keys[i][b]), want_k[b, i],
                                              err_msg=f"t={t} stream={b} slot={i} should hold frame {f}")
                np.testing.assert_array_equal(to_numpy(values[i][b]), want_v[b, i])
        ring.advance()
        t += 1


row_ops = st.lists(st.one_of(st.tuples(st.just("step"), st.lists(st.integers(0, 2), min_size=1, max_size=3)),
                             st.tuples(st.just("reset"), st.integers(0, 2))), min_size=1, max_size=16)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 3), ops=row_ops)
def test_rows_advance_independently(xp, T, ops):
    """Steps that name their rows (any subset, any order): each row's slots hold its own frames by the slot
    rule, whether they are read as views (rows in step) or gathered (clocks differ)."""
    batch = 3
    mk, mv = encodings(0, batch, T, xp)
    ring = MemoryRing.like(mk, mv)
    history = [[] for _ in range(batch)]  # frame codes written to each row since its start
    code = 0
    for op in ops:
        if op[0] == "reset":
            ring.reset(op[1])
            history[op[1]] = []
            continue
        rows = list(dict.fromkeys(op[1]))
        codes = [code + k for k in range(len(rows))]
        code += len(rows)
        # Row k of the input carries frame code codes[k] (encodings' stream 0 of frame `code`).
        cat = torch.cat if xp == "torch" else np.concatenate
        keys_in = cat([encodings(c, 1, T, xp)[0] for c in codes])
        values_in = cat([encodings(c, 1, T, xp)[1] for c in codes])
        ring.write(keys_in, values_in, rows)
        keys, values = ring.slot_keys(rows), ring.slot_values(rows)
        for k, r in enumerate(rows):
            history[r].append(codes[k])
            t = len(history[r]) - 1
            for i, f in enumerate(memory_frame_indices(t, 0, T)):
                want = encodings(history[r][f], 1, T, "numpy")
                np.testing.assert_array_equal(to_numpy(keys[i][k]), want[0][0, i], err_msg=f"row {r} slot {i}")
                np.testing.assert_array_equal(to_numpy(values[i][k]), want[1][0, i])
        ring.advance(rows)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
def test_slot_views_are_views_into_the_ring(xp):
    T, batch = 3, 2
    mk, mv = encodings(0, batch, T, xp)
    ring = MemoryRing.like(mk, mv)
    for t in range(5):
        mk, mv = encodings(t, batch, T, xp)
        ring.write(mk, mv)
        for view, store in [(v, ring.keys) for v in ring.slot_keys()] + [(v, ring.values) for v in ring.slot_values()]:
            if xp == "numpy":
                assert np.shares_memory(view, store) and view.flags["C_CONTIGUOUS"]
                assert view.base is store or view.base is store.base
            else:
                assert view.untyped_storage().data_ptr() == store.untyped_storage().data_ptr()
                assert view.is_contiguous()
        # The ring copies its input: the encoder may reuse its output buffers for the next frame.
        before = to_numpy(ring.slot_keys()[-1]).copy()
        mk[...] = 12345
        mv[...] = 12345
        np.testing.assert_array_equal(to_numpy(ring.slot_keys()[-1]), before)
        ring.advance()


def test_slot_view_follows_writes_without_copy():
    """A view handed to the head sees later writes to its position: it is the ring's memory, not a copy."""
    T, batch = 2, 1
    mk, mv = encodings(0, batch, T, "numpy")
    ring = MemoryRing.like(mk, mv)
    ring.write(mk, mv)
    view = ring.slot_keys()[0]
    ring.keys[...] = 7.0
    assert np.all(view == 7.0)


def test_reset_out_of_range_stream_leaves_ring_untouched():
    mk, mv = encodings(0, 2, 2, "numpy")
    ring = MemoryRing.like(mk, mv)
    ring.write(mk, mv)
    ring.advance()
    keys, fresh, t = ring.keys.copy(), list(ring.fresh), list(ring.clock)
    with pytest.raises(IndexError):
        ring.reset(2)
    assert ring.fresh == fresh and ring.clock == t and np.array_equal(ring.keys, keys)
