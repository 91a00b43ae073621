"""Video loaders in the official TMANet layouts, and the shared train-time transform."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tmanet.training.datasets import CamVidVideo, CityscapesVideo, TrainTransform
from tmanet.training.synthetic import ClipSpec, make_street_clip, write_cityscapes_sequence

FIRST = 100  # Cityscapes-style frame numbers that do not start at 0


@pytest.fixture(scope="module")
def cs_clips():
    return [make_street_clip(ClipSpec(frames=8, height=24, width=48, degradation=0.3, seed=s)) for s in (1, 2)]


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory, cs_clips):
    root = tmp_path_factory.mktemp("cityscapes")
    write_cityscapes_sequence(root, cs_clips, split="train", city="synth", first_frame=FIRST, annotate=[1, 7])
    return root


def _by_name(ds, name):
    for i in range(len(ds)):
        if Path(ds.samples[i].image).name == name:
            return i
    raise KeyError(name)


def _cs(seq, frame):
    return f"synth_{seq:06d}_{frame:06d}_leftImg8bit.png"


def test_cityscapes_samples_are_the_annotated_frames(cs_root, cs_clips):
    ds = CityscapesVideo(cs_root, memory_frames=2)
    names = sorted(Path(s.image).name for s in ds.samples)
    assert names == sorted(_cs(q, FIRST + f) for q in (0, 1) for f in (1, 7))
    item = ds[_by_name(ds, _cs(1, FIRST + 7))]
    assert np.array_equal(item["image"], cs_clips[1][0][7])
    assert np.array_equal(item["label"], cs_clips[1][1][7])
    assert item["label"].dtype == np.uint8 and item["memory"].dtype == np.uint8
    assert item["target_path"].endswith("leftImg8bit_sequence/train/synth/" + _cs(1, FIRST + 7))


@pytest.mark.parametrize("random_select", [False, True])  # range == T: both are continuous
def test_cityscapes_memory_is_previous_frames_oldest_first(cs_root, cs_clips, random_select):
    ds = CityscapesVideo(cs_root, memory_frames=3, random_select=random_select)
    i = _by_name(ds, _cs(0, FIRST + 7))
    item = ds[i]
    assert [Path(p).name for p in item["memory_paths"]] == [_cs(0, FIRST + f) for f in (4, 5, 6)]
    assert item["memory"].shape == (3, 24, 48, 3)
    for k, f in enumerate((4, 5, 6)):  # contents in the same order: t-3, t-2, t-1
        assert np.array_equal(item["memory"][k], cs_clips[0][0][f])
    assert ds.memory_offsets(i) == [3, 2, 1]


def test_cityscapes_warm_up_clamps_to_first_frame(cs_root, cs_clips):
    ds = CityscapesVideo(cs_root, memory_frames=3, random_select=False)
    item = ds[_by_name(ds, _cs(1, FIRST + 1))]
    assert [Path(p).name for p in item["memory_paths"]] == [_cs(1, FIRST)] * 3
    assert all(np.array_equal(m, cs_clips[1][0][0]) for m in item["memory"])


def test_random_select_within_range_sorted_oldest_first(cs_root):
    T, R = 2, 5
    ds = CityscapesVideo(cs_root, memory_frames=T, sequence_range=R, random_select=True, seed=3)
    i = _by_name(ds, _cs(0, FIRST + 7))
    seen = set()
    for epoch in range(25):
        ds.set_epoch(epoch)
        offsets = ds.memory_offsets(i)
        assert len(offsets) == T and len(set(offsets)) == T
        assert offsets == sorted(offsets, reverse=True) and all(1 <= o <= R for o in offsets)
        frames = ds.memory_frame_numbers(i)
        assert frames == sorted(frames) and frames == [FIRST + 7 - o for o in offsets]
        seen.add(tuple(offsets))
    assert len(seen) >= 4  # really random, not a fixed pick
    # Reproducible: a fresh dataset with the same seed and epoch picks the same frames.
    again = CityscapesVideo(cs_root, memory_frames=T, sequence_range=R, random_select=True, seed=3)
    again.set_epoch(24)
    assert again.memory_paths(i) == ds.memory_paths(i)
    # random_select=False ignores the range: continuous [t-T .. t-1].
    fixed = CityscapesVideo(cs_root, memory_frames=T, sequence_range=R, random_select=False)
    assert fixed.memory_frame_numbers(i) == [FIRST + 5, FIRST + 6]


def test_cityscapes_errors(tmp_path, cs_root):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CityscapesVideo(missing)
    (tmp_path / "empty" / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="gtFine"):
        CityscapesVideo(tmp_path / "empty")
    with pytest.raises(ValueError):
        CityscapesVideo(cs_root, memory_frames=3, sequence_range=2)

    broken = tmp_path / "broken"
    shutil.copytree(cs_root, broken)
    gone = broken / "leftImg8bit_sequence/train/synth" / _cs(0, FIRST + 5)
    gone.unlink()
    ds = CityscapesVideo(broken, memory_frames=3, random_select=False)
    with pytest.raises(FileNotFoundError, match=_cs(0, FIRST + 5)):
        ds[_by_name(ds, _cs(0, FIRST + 7))]
    target = broken / "leftImg8bit_sequence/train/synth" / _cs(1, FIRST + 7)
    target.unlink()
    with pytest.raises(FileNotFoundError, match=_cs(1, FIRST + 7)):
        CityscapesVideo(broken)


# ---------------------------------------------------------------------------------------------- CamVid

def _png(path: Path, value: int, shape=(6, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape + (3,), value, np.uint8)).save(path)


def _label_png(path: Path, fill: int, corner: int, shape=(6, 8)):
    lab = np.full(shape, fill, np.uint8)
    lab[0, 0] = corner
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lab).save(path)


def _full_rate_frames(folder: Path, tp_frames, seq_frames):
    """Frames ``0001TP_{n:06d}.png`` and ``Seq05VD_f{n:05d}.png``, each filled with its frame number mod 251."""
    for n in tp_frames:
        _png(folder / f"0001TP_{n:06d}.png", n % 251)
    for n in seq_frames:
        _png(folder / f"Seq05VD_f{n:05d}.png", n % 251)


def _frame_value(name: str) -> int:
    return int(name.rsplit("_", 1)[1].lstrip("f").split(".")[0]) % 251


@pytest.fixture
def camvid_root(tmp_path):
    root = tmp_path / "camvid"
    annotated = ["0001TP_006690.png", "0001TP_006720.png", "Seq05VD_f00000.png", "Seq05VD_f00030.png"]
    for name in annotated:
        _png(root / "train" / name, _frame_value(name))
        _label_png(root / "trainannot" / name, fill=3, corner=11)
    # Full-rate frames: 0001TP from 006686 on, Seq05VD from f00000 on.
    _full_rate_frames(root / "frames", range(6686, 6721), range(0, 31))
    return root


def test_camvid_memory_names_keep_prefix_and_padding(camvid_root):
    ds = CamVidVideo(camvid_root, memory_frames=2, random_select=False, frames_dir="frames")
    assert len(ds) == 4
    expect = {
        "0001TP_006720.png": ["0001TP_006718.png", "0001TP_006719.png"],
        "0001TP_006690.png": ["0001TP_006688.png", "0001TP_006689.png"],
        "Seq05VD_f00030.png": ["Seq05VD_f00028.png", "Seq05VD_f00029.png"],
        "Seq05VD_f00000.png": ["Seq05VD_f00000.png", "Seq05VD_f00000.png"],  # warm-up clamp
    }
    for name, mem in expect.items():
        item = ds[_by_name(ds, name)]
        assert [Path(p).name for p in item["memory_paths"]] == mem
        assert all(Path(p).parent == camvid_root / "frames" for p in item["memory_paths"])
        assert [int(m[0, 0, 0]) for m in item["memory"]] == [_frame_value(m) for m in mem]
        assert int(item["image"][0, 0, 0]) == _frame_value(name)
        assert item["label"][0, 0] == 11 and item["label"][1, 1] == 3


def test_camvid_warm_up_clamps_to_first_existing_frame(camvid_root):
    ds = CamVidVideo(camvid_root, memory_frames=5, random_select=False, frames_dir=camvid_root / "frames")
    item = ds[_by_name(ds, "0001TP_006690.png")]
    assert [Path(p).name for p in item["memory_paths"]] == [
        "0001TP_006686.png", "0001TP_006686.png", "0001TP_006687.png", "0001TP_006688.png", "0001TP_006689.png"]


def test_camvid_label_map(camvid_root):
    ds = CamVidVideo(camvid_root, memory_frames=1, frames_dir="frames", label_map={11: 255})
    label = ds[0]["label"]
    assert label[0, 0] == 255 and label[1, 1] == 3


def test_camvid_errors(camvid_root, tmp_path):
    # Without frames_dir the memory comes from the annotated folder, where t-1 does not exist.
    ds = CamVidVideo(camvid_root, memory_frames=2, random_select=False)
    with pytest.raises(FileNotFoundError, match="0001TP_006718.png"):
        ds[_by_name(ds, "0001TP_006720.png")]
    with pytest.raises(FileNotFoundError, match="missing_root"):
        CamVidVideo(tmp_path / "missing_root")
    with pytest.raises(FileNotFoundError, match="nope"):
        CamVidVideo(camvid_root, frames_dir="nope")
    (camvid_root / "trainannot" / "Seq05VD_f00030.png").unlink()
    with pytest.raises(FileNotFoundError, match="Seq05VD_f00030.png"):
        CamVidVideo(camvid_root)
    (camvid_root / "val").mkdir()
    (camvid_root / "valannot").mkdir()
    with pytest.raises(ValueError, match="val"):
        CamVidVideo(camvid_root, split="val")


@pytest.fixture
def camvid_official_root(tmp_path):
    """The official TMANet CamVid layout: images/, labels/{name}_L.png, annotations/{split}.txt, and the
    full-rate frames in images_sequence/."""
    root = tmp_path / "camvid_official"
    names = {"train": ["0001TP_006720", "Seq05VD_f00002"], "val": ["0001TP_006690"]}
    for split, listed in names.items():
        root.joinpath("annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.txt").write_text("\n".join(listed) + "\n\n")
        for name in listed:
            _png(root / "images" / f"{name}.png", _frame_value(name))
            _label_png(root / "labels" / f"{name}_L.png", fill=4, corner=0)  # 'void' is class 0 of the official 12
    _full_rate_frames(root / "images_sequence", range(6680, 6720), range(0, 2))
    return root


def test_camvid_official_layout(camvid_official_root):
    from tmanet.training.data import parse_data
    assert parse_data(camvid_official_root).kind == "camvid"
    ds = CamVidVideo(camvid_official_root, split="train", memory_frames=4, sequence_range=4)
    assert ds.layout == "official" and ds.frames_dir == camvid_official_root / "images_sequence"
    assert [Path(s.image).name for s in ds.samples] == ["0001TP_006720.png", "Seq05VD_f00002.png"]  # file order
    item = ds[0]
    # The official sampler with sequence_range == memory_frames == 4: frames t-4..t-1, oldest first.
    assert [Path(p).name for p in item["memory_paths"]] == [f"0001TP_{n:06d}.png" for n in range(6716, 6720)]
    assert [int(m[0, 0, 0]) for m in item["memory"]] == [n % 251 for n in range(6716, 6720)]
    assert Path(item["label_path"]).name == "0001TP_006720_L.png"
    assert item["label"][0, 0] == 0 and item["label"][1, 1] == 4
    # Warm-up: the sequence starts at f00000, two frames before the target.
    assert [Path(p).name for p in ds[1]["memory_paths"]] == [
        "Seq05VD_f00000.png", "Seq05VD_f00000.png", "Seq05VD_f00000.png", "Seq05VD_f00001.png"]
    assert len(CamVidVideo(camvid_official_root, split="val")) == 1


def test_camvid_official_layout_errors(camvid_official_root):
    (camvid_official_root / "labels" / "Seq05VD_f00002_L.png").unlink()
    with pytest.raises(FileNotFoundError, match="Seq05VD_f00002_L.png"):
        CamVidVideo(camvid_official_root)
    (camvid_official_root / "annotations" / "val.txt").write_text("0001TP_999999\n")
    with pytest.raises(FileNotFoundError, match=r"0001TP_999999.png \(listed in .*val.txt\)"):
        CamVidVideo(camvid_official_root, split="val")
    (camvid_official_root / "annotations" / "test.txt").write_text("\n")
    with pytest.raises(ValueError, match="test.txt lists no names"):
        CamVidVideo(camvid_official_root, split="test")


# ---------------------------------------------------------------------------------------- transforms

def _block_label(rng, h, w, block=8, classes=10):
    coarse = rng.integers(0, classes, (h // block + 1, w // block + 1)).astype(np.uint8)
    return np.kron(coarse, np.ones((block, block), np.uint8))[:h, :w]


LUT = np.array([[(37 * k) % 256, (91 * k + 40) % 256, (151 * k + 80) % 256] for k in range(256)], np.uint8)


def test_same_geometry_for_image_memory_and_label():
    rng = np.random.default_rng(0)
    label = _block_label(rng, 64, 96)
    image = LUT[label]
    memory = np.stack([image, image, image])
    flips = set()
    for seed in range(8):
        tf = TrainTransform(crop_size=(40, 56), ratio_range=(0.5, 2.0), flip_prob=0.5, seed=seed)
        out_img, out_mem, out_lab = tf(image, memory, label)
        assert out_img.shape == (40, 56, 3) and out_mem.shape == (3, 40, 56, 3) and out_lab.shape == (40, 56)
        assert all(np.array_equal(m, out_img) for m in out_mem)
        # Away from class boundaries the colour still encodes the label: image and label aligned.
        lab = out_lab.astype(np.int32)
        pad = np.pad(lab, 2, constant_values=-1)
        interior = np.ones_like(lab, bool)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                interior &= pad[2 + dy:2 + dy + 40, 2 + dx:2 + dx + 56] == lab
        interior &= lab != 255
        assert interior.sum() > 100
        err = np.abs(out_img[interior].astype(np.int16) - LUT[out_lab[interior]]).max()
        assert err <= 3
        params = tf.sample_params(64, 96, np.random.default_rng(seed))
        flips.add(params["flip"])
    assert flips == {True, False}


def test_flip_mirrors_everything_exactly():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    memory = rng.integers(0, 256, (2, 12, 20, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (12, 20), dtype=np.uint8)
    tf = TrainTransform(crop_size=(12, 20), ratio_range=(1.0, 1.0), flip_prob=1.0)
    out_img, out_mem, out_lab = tf(image, memory, label)
    assert np.array_equal(out_img, image[:, ::-1])
    assert np.array_equal(out_mem, memory[:, :, ::-1])
    assert np.array_equal(out_lab, label[:, ::-1])


def test_padding_uses_zero_image_and_ignore_label():
    rng = np.random.default_rng(2)
    image = rng.integers(1, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (20, 30), dtype=np.uint8)
    tf = TrainTransform(crop_size=(16, 24), ratio_range=(0.5, 0.5), flip_prob=0.0)
    out_img, out_mem, out_lab = tf(image, image[None], label)
    assert out_lab.shape == (16, 24)
    assert (out_lab[10:] == 255).all() and (out_lab[:, 15:] == 255).all()
    assert (out_lab[:10, :15] != 255).all()
    assert (out_img[10:] == 0).all() and (out_mem[0][:, 15:] == 0).all()


def test_transform_is_deterministic_and_mmseg_scale():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (30, 40), dtype=np.uint8)
    a = TrainTransform(crop_size=(16, 16), seed=7)(image, image[None], label)
    b = TrainTransform(crop_size=(16, 16), seed=7)(image, image[None], label)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = TrainTransform(crop_size=(16, 16))(image, image[None], label, rng=np.random.default_rng(5))
    d = TrainTransform(crop_size=(16, 16), seed=99)(image, image[None], label, rng=np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(c, d))
    tf = TrainTransform(img_scale=(2048, 1024))
    assert tf.resized_shape(1024, 2048, 1.0) == (1024, 2048)
    assert tf.resized_shape(1024, 2048, 0.5) == (512, 1024)
    assert TrainTransform(img_scale=(960, 720)).resized_shape(720, 960, 2.0) == (1440, 1920)


def test_dataset_with_transform_is_seeded_per_sample(cs_root):
    def build(seed):
        tf = TrainTransform(crop_size=(16, 32), ratio_range=(0.75, 1.5), photometric=True)
        return CityscapesVideo(cs_root, memory_frames=2, sequence_range=4, transform=tf, seed=seed)

    a, b, c = build(0), build(0), build(1)
    item = a[0]
    assert item["image"].shape == (16, 32, 3) and item["memory"].shape == (2, 16, 32, 3)
    assert item["label"].shape == (16, 32)
    # Same (seed, epoch, index) -> same sample, whatever was loaded before.
    b[1]
    assert all(np.array_equal(item[k], b[0][k]) for k in ("image", "memory", "label"))
    differs = any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(len(a)))
    a.set_epoch(1)
    differs_epoch = any(not np.array_equal(a[i]["image"], b[i]["image"]) for i in range(len(a)))
    assert differs and differs_epoch
