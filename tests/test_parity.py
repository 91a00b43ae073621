"""Parity with the official TMANet code on set A (golden logits of the official model, cityscapes config).

Run with ``-s`` to see the measured max |delta| per frame; they are also in every assertion message.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import max_abs, top2_margin
from tmanet.test_clips import make_noise_clip
from tmanet.synthetic_weights import official_layout_state_dict, read_manifest, state_dict_sha256

ATOL = 1e-3          # set A's recommended float32 tolerance (rtol 0)
MASK_MARGIN = 2e-3   # masks must agree wherever the golden top-2 margin is at least this


# -- the inputs: our generator reproduces the reference ones exactly ------------------------------------
def test_generated_state_dict_matches_reference_sha256(set_a):
    info = set_a["info"]["weights"]
    sd = official_layout_state_dict("cityscapes", info["seed"])
    assert len(sd) == info["n_tensors"] == 418
    assert state_dict_sha256(sd) == info["state_dict_sha256"] == \
        "bb14f00d82b9df95f94f8ea87d3aad34df7a0725303f5eb5c8289ec3d5a09915"
    # The order and shapes are the manifest's, and another seed gives other weights.
    assert [(k, tuple(v.shape), v.dtype) for k, v in sd.items()] == read_manifest("cityscapes")
    assert state_dict_sha256(official_layout_state_dict("cityscapes", 1)) != info["state_dict_sha256"]


def test_generated_clip_matches_reference_bytes(set_a):
    c = set_a["info"]["clip"]
    clip = make_noise_clip(c["frames"], c["H"], c["W"], c["seed"])
    assert clip.dtype == np.uint8 and clip.shape == (5, 64, 128, 3)
    assert clip.tobytes() == set_a["clip"].tobytes()
    assert clip.flags.c_contiguous  # frames bind to an engine as they are, like decoded video


def test_checkpoint_file_layout(official_cityscapes_ckpt, set_a):
    obj = torch.load(official_cityscapes_ckpt, weights_only=True)
    assert set(obj) == {"meta", "state_dict"}
    assert obj["meta"]["note"] == set_a["info"]["weights"]["meta"]["note"]
    assert state_dict_sha256(obj["state_dict"]) == set_a["info"]["weights"]["state_dict_sha256"]


# -- the model against the official outputs -------------------------------------------------------------
@pytest.fixture(scope="module")
def predicted(official_model, set_a):
    return official_model.predict_clip(set_a["clip"])


def test_predict_clip_matches_golden_logits(predicted, set_a):
    golden = set_a["logits"]
    assert predicted.shape == golden.shape and predicted.dtype == np.float32
    deltas = [max_abs(predicted[i], golden[i]) for i in range(len(golden))]
    print(f"\nset A predict_clip vs golden, max |delta| per frame (frames 2,3,4): {deltas}")
    assert max(deltas) <= ATOL, f"max |delta| per frame {deltas} exceeds {ATOL}"


def test_predict_clip_matches_golden_masks(predicted, set_a):
    for i, (golden_logits, golden_mask) in enumerate(zip(set_a["logits"], set_a["masks"])):
        # The golden masks are the argmax of the golden logits (sanity of the data itself).
        np.testing.assert_array_equal(golden_logits.argmax(0), golden_mask)
        sure = top2_margin(golden_logits) >= MASK_MARGIN
        mask = predicted[i].argmax(0)
        wrong = int((mask != golden_mask)[sure].sum())
        assert wrong == 0, f"frame {i + 2}: {wrong} confident pixels differ from the golden mask"


def test_memory_order_is_not_newest_first(predicted, set_a):
    """The diagnostic file is the official model fed [t-1, t-2]: matching it means a reversed memory."""
    diag = set_a["diagnostic"]
    deltas = [max_abs(predicted[i], diag[i]) for i in range(len(diag))]
    print(f"\nset A predict_clip vs DIAGNOSTIC newest-first, max |delta| per frame: {deltas}")
    assert min(deltas) > 1.0, f"output is close to the newest-first diagnostic: {deltas}"


# -- the streaming path (BN-folded split + ring buffer) -------------------------------------------------
@pytest.fixture(scope="module")
def streamed(official_model, set_a):
    return list(official_model.stream(set_a["clip"]))


def test_stream_matches_predict_clip_and_golden(official_model, streamed, predicted, set_a):
    T = official_model.config.memory_frames
    assert len(streamed) == len(set_a["clip"])
    assert [r.index for r in streamed] == list(range(len(set_a["clip"])))
    vs_predict, vs_golden = [], []
    for t in range(T, len(streamed)):
        r = streamed[t]
        assert r.logits.shape == (19, 64, 128) and r.mask.shape == (64, 128) and r.mask.dtype == np.uint8
        np.testing.assert_array_equal(r.mask, r.logits.argmax(0))
        vs_predict.append(max_abs(r.logits, predicted[t - T]))
        vs_golden.append(max_abs(r.logits, set_a["logits"][t - T]))
        sure = top2_margin(set_a["logits"][t - T]) >= MASK_MARGIN
        assert int((r.mask != set_a["masks"][t - T])[sure].sum()) == 0, f"frame {t}: mask differs from golden"
    print(f"\nset A stream vs predict_clip (frames 2,3,4): {vs_predict}\nset A stream vs golden: {vs_golden}")
    assert max(vs_predict) <= ATOL, f"stream vs predict_clip {vs_predict}"
    assert max(vs_golden) <= ATOL, f"stream vs golden {vs_golden}"


def warmup_memory(t: int, T: int) -> list[int]:
    """Frames memory slots 0..T-1 read at frame t of a stream starting at 0: t-T+i, clamped to frame 0.
    Written out here on purpose, independent of tmanet.slots."""
    return [max(t - T + i, 0) for i in range(T)]


def test_stream_warmup_clamps_to_first_frame(official_model, streamed, set_a):
    clip = set_a["clip"]
    T = official_model.config.memory_frames
    deltas = []
    for t in range(T):
        # A clip whose first T frames are the clamped memory of frame t and whose last frame is t: the
        # official protocol's only output for it is frame t with exactly that memory.
        reference = official_model.predict_clip(np.stack([clip[i] for i in warmup_memory(t, T)] + [clip[t]]))[0]
        deltas.append(max_abs(streamed[t].logits, reference))
    assert warmup_memory(0, 2) == [0, 0] and warmup_memory(1, 2) == [0, 0]
    print(f"\nset A stream warm-up frames 0..{T - 1} vs clamped reference: {deltas}")
    assert max(deltas) <= ATOL, f"warm-up frames vs clamped reference {deltas}"
    # Frame 1's memory is [0, 0], not [0, 1] or frame 1 itself: the clamp changes the output.
    not_clamped = official_model.predict_clip(np.stack([clip[0], clip[1], clip[1]]))[0]
    assert max_abs(streamed[1].logits, not_clamped) > 1e-2
