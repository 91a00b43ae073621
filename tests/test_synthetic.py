"""Synthetic street-scene clips: determinism, labels, ego-motion, degradations, Cityscapes writer."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from tmanet.training.synthetic import (
    SYNTHETIC_CLASSES,
    ClipSpec,
    degrade_frame,
    degrade_frame_with_damage,
    make_street_clip,
    make_street_clip_with_damage,
    render_clip,
    write_cityscapes_sequence,
)

SPEC = ClipSpec(frames=14, height=48, width=96, degradation=0.5, seed=3)


@pytest.fixture(scope="module")
def clip():
    return make_street_clip(SPEC)


@pytest.fixture(scope="module")
def clean():
    return render_clip(SPEC)


def test_shapes_and_dtypes(clip):
    frames, labels = clip
    assert frames.shape == (14, 48, 96, 3) and frames.dtype == np.uint8
    assert labels.shape == (14, 48, 96) and labels.dtype == np.uint8


def test_same_seed_same_clip_other_seed_other_clip(clip):
    frames, labels = make_street_clip(SPEC)
    assert np.array_equal(frames, clip[0]) and np.array_equal(labels, clip[1])
    other_f, other_l = make_street_clip(dataclasses.replace(SPEC, seed=4))
    assert not np.array_equal(other_f, frames)
    assert not np.array_equal(other_l, labels)


def test_labels_are_synthetic_classes_and_several_present(clip):
    labels = clip[1]
    present = set(np.unique(labels).tolist())
    assert present <= set(SYNTHETIC_CLASSES)
    assert {0, 1, 2, 10}.issubset(present)  # road, sidewalk, building, sky
    assert len(present) >= 6
    assert all(len(np.unique(lab)) >= 4 for lab in labels)
    assert SYNTHETIC_CLASSES[0] == "road" and SYNTHETIC_CLASSES[13] == "car"


def test_ego_motion_consecutive_frames_agree_more_than_distant(clean):
    labels = clean[1]
    near = np.mean([(labels[t] == labels[t + 1]).mean() for t in range(3)])
    far = np.mean([(labels[t] == labels[t + 10]).mean() for t in range(3)])
    assert near > 0.85
    assert near > far + 0.03
    assert not np.array_equal(labels[0], labels[1])  # the scene does move


def test_colour_alone_does_not_give_the_class():
    # Majority label per quantised colour, learnt on one clip, applied to another clip's clean frames.
    a_img, a_lab = render_clip(ClipSpec(frames=3, height=48, width=96, seed=11))
    b_img, b_lab = render_clip(ClipSpec(frames=3, height=48, width=96, seed=12))

    def key(img):
        q = img.astype(np.int64) // 16
        return (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]

    counts = np.zeros((16 ** 3, 256), np.int64)
    np.add.at(counts, (key(a_img).ravel(), a_lab.ravel()), 1)
    table = counts.argmax(1)
    accuracy = (table[key(b_img)] == b_lab).mean()
    assert accuracy < 0.8


def test_zero_degradation_is_the_clean_rendering(clean, clip):
    frames0, labels0 = make_street_clip(dataclasses.replace(SPEC, degradation=0.0))
    assert np.array_equal(frames0, clean[0])
    assert np.array_equal(labels0, clean[1])
    assert np.array_equal(clip[1], clean[1])  # labels never see the degradation


def test_stronger_degradation_corrupts_more(clean):
    err = {}
    for d in (0.0, 0.3, 1.0):
        frames, _ = make_street_clip(dataclasses.replace(SPEC, degradation=d))
        err[d] = np.abs(frames.astype(np.int16) - clean[0]).mean()
    assert err[0.0] == 0
    assert err[1.0] > err[0.3] > 0
    assert err[1.0] > 20  # heavy: a single frame is substantially destroyed


def test_degradation_changes_from_frame_to_frame(clean, clip):
    diff = np.abs(clip[0].astype(np.int16) - clean[0]).sum(-1)
    big = diff > 60
    assert big.any()
    # The corrupted regions are drawn anew per frame, not a fixed overlay.
    assert np.mean([(big[t] != big[t + 1]).mean() for t in range(len(big) - 1)]) > 0.01


def test_degrade_frame_zero_strength_is_identity_and_seeded():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(degrade_frame(img, 0.0, np.random.default_rng(1)), img)
    a = degrade_frame(img, 0.8, np.random.default_rng(1))
    b = degrade_frame(img, 0.8, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == img.shape


class _Draws:
    """A stand-in generator that hands out prescribed draws in the order degrade_frame asks for them."""

    def __init__(self, *arrays):
        self.arrays = list(arrays)

    def random(self, shape=None, dtype=None):
        return np.asarray(self.arrays.pop(0), np.float32)

    standard_normal = random


def _draws(H, W, glare=(), drops=()):
    # u: no blur (u0 = 1), contrast 1 (u3 = 0), gain 1 (u4 = 0.45), no noise (u5 irrelevant: zero normals)
    u = [1.0, 0, 0, 0.0, 0.45, 0, 0, 0]
    glare = list(glare) + [[1.0, 0, 0, 0, 0]] * (4 - len(glare))   # active = 1: inactive
    drops = list(drops) + [[1.0, 0, 0, 0, 0, 0, 0]] * (5 - len(drops))
    return _Draws(u, glare, drops, np.zeros((H, W, 3)), np.zeros((H, W, 3)))


def test_damage_of_a_dropped_rectangle_is_exactly_the_rectangle():
    H, W = 20, 40
    img = np.full((H, W, 3), 120, np.uint8)
    # one black rectangle at strength 1: w = int(0.215 * 40) = 8, h = int(0.215 * 20) = 4,
    # columns int(0.5 * 33) = 16.., rows int(0.5 * 17) = 8..
    out, damage = degrade_frame_with_damage(img, 1.0, _draws(H, W, drops=[[0.0, 0.5, 0.5, 0.5, 0.5, 0.1, 0]]))
    expected = np.zeros((H, W), bool)
    expected[8:12, 16:24] = True
    assert np.array_equal(damage, expected)
    assert (out[expected] == 0).all() and (out[~expected] == 120).all()


def test_damage_of_a_glare_blob_is_its_core():
    H, W = 40, 40
    img = np.full((H, W, 3), 60, np.uint8)
    # a glare blob centred at (20, 20), rad 0.5 -> sigma = 0.11 * 40 = 4.4 px, intensity 1 -> peak alpha 1:
    # alpha = exp(-r^2 / (2 sigma^2)) >= 0.5 where r^2 <= 2 sigma^2 ln 2
    out, damage = degrade_frame_with_damage(img, 1.0, _draws(H, W, glare=[[0.0, 0.5, 0.5, 0.5, 1.0]]))
    ys, xs = np.mgrid[0:H, 0:W]
    inside = ((xs - 20.0) ** 2 + (ys - 20.0) ** 2) <= 2 * 4.4 ** 2 * np.log(2)
    assert np.array_equal(damage, inside) and 80 <= damage.sum() <= 90  # disc area pi * 2 sigma^2 ln 2 = 84
    assert out[damage].min() >= 60 + 195 * 0.5 + 30  # at least half-way to white, plus the over-exposure


def test_clip_damage_marks_the_destroyed_pixels(clean):
    for d in (0.0, 0.5, 1.0):
        spec = dataclasses.replace(SPEC, degradation=d)
        frames, labels, damage = make_street_clip_with_damage(spec)
        plain = make_street_clip(spec)
        assert np.array_equal(frames, plain[0]) and np.array_equal(labels, plain[1])
        assert damage.shape == labels.shape and damage.dtype == bool
        if d == 0.0:
            assert not damage.any()
            continue
        err = np.abs(frames.astype(np.int16) - clean[0]).mean(-1)
        assert 0.02 < damage.mean() < 0.5
        assert err[damage].mean() > 2 * err[~damage].mean()  # far from the clean scene where marked


def test_shorter_clip_is_a_prefix_of_a_longer_one(clip):
    frames, labels = make_street_clip(dataclasses.replace(SPEC, frames=5))
    assert np.array_equal(frames, clip[0][:5]) and np.array_equal(labels, clip[1][:5])


@pytest.mark.parametrize("bad", [dict(degradation=1.5), dict(degradation=-0.1), dict(frames=0), dict(seed=-1)])
def test_invalid_spec(bad):
    with pytest.raises(ValueError):
        ClipSpec(**bad)


def test_write_cityscapes_sequence_exact_names(tmp_path):
    spec = ClipSpec(frames=4, height=16, width=32, degradation=0.2, seed=5)
    arrays = make_street_clip(dataclasses.replace(spec, seed=6))
    paths = write_cityscapes_sequence(tmp_path, [spec, arrays], split="val", city="synth",
                                      first_seq=7, first_frame=19, annotate=[1, -1])
    rel = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    expected = sorted(
        [f"leftImg8bit_sequence/val/synth/synth_{s:06d}_{f:06d}_leftImg8bit.png" for s in (7, 8) for f in range(19, 23)]
        + [f"gtFine/val/synth/synth_{s:06d}_{f:06d}_gtFine_labelTrainIds.png" for s in (7, 8) for f in (20, 22)]
    )
    assert rel == expected
    all_files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert all_files == expected
    # Round trip: PNGs hold exactly the arrays.
    img = np.asarray(Image.open(tmp_path / "leftImg8bit_sequence/val/synth/synth_000008_000021_leftImg8bit.png"))
    assert np.array_equal(img, arrays[0][2])
    lab = np.asarray(Image.open(tmp_path / "gtFine/val/synth/synth_000008_000022_gtFine_labelTrainIds.png"))
    assert lab.dtype == np.uint8 and np.array_equal(lab, arrays[1][3])


def test_write_cityscapes_sequence_annotates_every_frame_by_default(tmp_path):
    paths = write_cityscapes_sequence(tmp_path, ClipSpec(frames=3, height=16, width=32, seed=1))
    labels = sorted(p.name for p in paths if "gtFine" in p.parts)
    assert labels == [f"synth_000000_{f:06d}_gtFine_labelTrainIds.png" for f in range(3)]
    assert all((tmp_path / "leftImg8bit_sequence" / "train" / "synth").glob("*.png"))


def test_write_cityscapes_sequence_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_cityscapes_sequence(tmp_path, [(np.zeros((2, 8, 8), np.uint8), None)])
    with pytest.raises(ValueError):
        write_cityscapes_sequence(tmp_path, ClipSpec(frames=2, height=16, width=16), annotate=[5])
