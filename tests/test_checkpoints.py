"""Checkpoint loading: official mmcv files, bare state_dicts, our native format, and every way they go wrong."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import tmanet
from tmanet.checkpoints import CheckpointError, load_model, save_checkpoint
from tmanet.presets import ModelConfig, get_preset
from tmanet.test_clips import make_noise_clip
from tmanet.synthetic_weights import read_manifest, state_dict_sha256

SHAPE_FIELDS = ("depth", "base_channels", "memory_frames", "key_channels", "value_channels", "channels",
                "num_classes", "aggregation")


def training_only(manifest):
    return {k for k, _, _ in read_manifest(manifest)
            if k.startswith("auxiliary_head.") or k.endswith("num_batches_tracked")}


# -- official layout -------------------------------------------------------------------------------------
def test_official_cityscapes_loads_without_preset(official_model, official_cityscapes_ckpt):
    cfg = official_model.config
    assert (cfg.depth, cfg.memory_frames, cfg.key_channels, cfg.value_channels, cfg.num_classes) == (50, 2, 64, 256, 19)
    assert cfg == get_preset("cityscapes-r50")
    assert official_model.load_format == "mmcv" and not official_model.training
    # Every inference weight came from the file.
    file_sd = torch.load(official_cityscapes_ckpt, weights_only=True)["state_dict"]
    for k, v in official_model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, file_sd[k]), k


def test_official_cityscapes_loads_with_preset(official_cityscapes_ckpt, official_model):
    model = load_model(official_cityscapes_ckpt, preset="cityscapes-r50")
    assert model.config == get_preset("cityscapes-r50")
    assert state_dict_sha256(model.state_dict()) == state_dict_sha256(official_model.state_dict())


def test_training_only_entries_are_skipped(official_model):
    skipped = set(official_model.skipped_keys)
    assert skipped == training_only("cityscapes")
    assert len(skipped) == 8 + 68  # auxiliary head (8, one of them its BN counter) + the other BN counters
    assert official_model.auxiliary_head is None


def test_with_aux_keeps_the_auxiliary_head(official_camvid_ckpt):
    model = load_model(official_camvid_ckpt, with_aux=True)
    assert model.auxiliary_head is not None
    assert set(model.skipped_keys) == {k for k in training_only("camvid") if k.endswith("num_batches_tracked")}
    file_sd = torch.load(official_camvid_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.auxiliary_head.conv_seg.weight, file_sd["auxiliary_head.conv_seg.weight"])


def test_official_camvid_loads_strictly_into_its_preset(official_camvid_ckpt):
    preset = get_preset("camvid-r50")
    model = load_model(official_camvid_ckpt, preset="camvid-r50")
    assert model.config == preset
    assert set(model.skipped_keys) == training_only("camvid")
    inferred = load_model(official_camvid_ckpt).config
    assert {f: getattr(inferred, f) for f in SHAPE_FIELDS} == {f: getattr(preset, f) for f in SHAPE_FIELDS}
    assert inferred.memory_frames == 4 and inferred.num_classes == 12
    assert inferred.align_corners is False  # camvid keeps mmseg's default, unlike cityscapes


def test_wrong_preset_names_the_disagreeing_fields(official_camvid_ckpt):
    with pytest.raises(CheckpointError) as e:
        load_model(official_camvid_ckpt, preset="cityscapes-r50")
    msg = str(e.value)
    assert "memory_frames" in msg and "num_classes" in msg and "cityscapes-r50" in msg
    assert "4" in msg and "12" in msg


# -- broken and unsafe files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model(seed=2)


@pytest.fixture(scope="module")
def tiny_clip():
    return make_noise_clip(3, 32, 64, seed=5)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")


def test_truncated_file_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "full.pth"
    save_checkpoint(tiny, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_model(cut)
    assert str(cut) in str(e.value)


def test_garbage_file_is_not_reported_as_unsafe(tmp_path):
    path = tmp_path / "text.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(path)


def test_key_problems_are_listed_together(tiny, tiny_config, tmp_path):
    sd = OrderedDict(tiny.state_dict())
    del sd["decode_head.bottleneck.bn.running_var"]
    del sd["backbone.layer2.0.conv1.weight"]
    sd["backbone.layer3.1.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    sd["decode_head.extra_conv.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"meta": {}, "state_dict": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, preset=tiny_config)
    msg = str(e.value)
    for expected in ("2 missing keys", "decode_head.bottleneck.bn.running_var", "backbone.layer2.0.conv1.weight",
                     "1 unexpected keys", "decode_head.extra_conv.weight",
                     "1 mis-shaped keys", "backbone.layer3.1.conv2.weight: checkpoint (3, 3, 3, 3)"):
        assert expected in msg, f"{expected!r} not in:\n{msg}"


class Payload:
    """Unpickling this writes a marker file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_that_runs_code_is_refused(tiny, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny.state_dict(), "meta": {"x": Payload(marker)}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (so the check above can fail).
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


# -- round trips ----------------------------------------------------------------------------------------
def test_native_round_trip(tiny, tiny_clip, tmp_path):
    path = tmp_path / "native.pth"
    save_checkpoint(tiny, path, meta={"run": "test"})
    assert not os.path.exists(f"{path}.tmp")
    model = load_model(path)  # the native format carries its config: no preset needed
    assert model.config == tiny.config and model.load_format == "native"
    np.testing.assert_array_equal(model.predict_clip(tiny_clip), tiny.predict_clip(tiny_clip))


def test_bare_state_dict_round_trip(tiny, tiny_config, tiny_clip, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(tiny.state_dict(), path)
    model = load_model(path, preset=tiny_config)
    assert model.load_format == "state_dict"
    expected = tiny.predict_clip(tiny_clip)
    np.testing.assert_array_equal(model.predict_clip(tiny_clip), expected)
    # Without a preset the shapes give the architecture.
    inferred = load_model(path)
    assert {f: getattr(inferred.config, f) for f in SHAPE_FIELDS} == {f: getattr(tiny_config, f) for f in SHAPE_FIELDS}
    np.testing.assert_array_equal(inferred.predict_clip(tiny_clip), expected)


def test_place_read_round_trips_and_is_inferred(make_tiny_model, tiny_clip, tmp_path):
    placed = make_tiny_model(seed=4, place_read=True)
    expected = placed.predict_clip(tiny_clip)
    save_checkpoint(placed, tmp_path / "native.pth")
    torch.save(placed.state_dict(), tmp_path / "bare.pth")
    for name in ("native.pth", "bare.pth"):
        model = load_model(tmp_path / name)
        assert model.config.place_read, name
        np.testing.assert_array_equal(model.predict_clip(tiny_clip), expected)
    # an official-layout file (no place read) infers none
    torch.save(make_tiny_model(seed=4).state_dict(), tmp_path / "plain.pth")
    assert load_model(tmp_path / "plain.pth").config.place_read is False


@pytest.mark.parametrize("wrapper", ["bare", "mmcv"])
def test_ddp_module_prefix_is_accepted(tiny, tiny_config, tiny_clip, tmp_path, wrapper):
    sd = OrderedDict((f"module.{k}", v) for k, v in tiny.state_dict().items())
    path = tmp_path / "ddp.pth"
    torch.save(sd if wrapper == "bare" else {"meta": {}, "state_dict": sd}, path)
    model = load_model(path, preset=tiny_config)
    np.testing.assert_array_equal(model.predict_clip(tiny_clip), tiny.predict_clip(tiny_clip))


# -- the synthetic official-layout generator ------------------------------------------------------------
def test_manifest_lookup_and_parse_errors(tmp_path):
    from tmanet.synthetic_weights import manifest_path
    assert manifest_path("cityscapes-r50") == manifest_path("cityscapes")
    assert manifest_path("camvid").name == "tmanet_r50-d8_camvid_state_dict_manifest.tsv"
    with pytest.raises(FileNotFoundError, match="cityscapes"):
        manifest_path("kitti")
    cases = {"two_fields.tsv": ("a.weight\t3\n", "expected key<TAB>shape<TAB>dtype"),
             "dtype.tsv": ("a.weight\t3\tfloat99\n", "unknown dtype"),
             "shape.tsv": ("a.weight\t3,x\tfloat32\n", "bad shape"),
             "dup.tsv": ("a.weight\t3\tfloat32\na.weight\t3\tfloat32\n", "duplicate key")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_manifest(tmp_path / name)


def test_fill_rule_refuses_unknown_entries():
    from tmanet.synthetic_weights import official_layout_state_dict
    with pytest.raises(ValueError, match="no fill rule for decode_head.fc.weight"):
        official_layout_state_dict([("decode_head.fc.weight", (4, 3), torch.float32)], 0)
    sd = official_layout_state_dict([("x.bn.num_batches_tracked", (), torch.int64),
                                     ("x.conv3.weight", (8, 4, 3, 3), torch.float32)], 0)
    assert sd["x.bn.num_batches_tracked"].item() == 0 and sd["x.bn.num_batches_tracked"].dtype == torch.int64
    # num_batches_tracked draws nothing: the conv weight is the generator's first draw, damped (gain 0.3).
    first = torch.randn((8, 4, 3, 3), generator=torch.Generator().manual_seed(0)) * ((2.0 / 36) ** 0.5 * 0.3)
    assert torch.equal(sd["x.conv3.weight"], first)


def test_generator_cli(tmp_path):
    from tmanet.synthetic_weights import main, official_layout_state_dict
    out = tmp_path / "camvid.pth"
    assert main(["--manifest", "camvid", "--seed", "3", "--out", str(out)]) == 0
    obj = torch.load(out, weights_only=True)
    assert state_dict_sha256(obj["state_dict"]) == state_dict_sha256(official_layout_state_dict("camvid", 3))
    clip_path = tmp_path / "clip.npy"
    assert main(["--make-clip", "--frames", "3", "--height", "16", "--width", "24", "--seed", "4",
                 "--out", str(clip_path)]) == 0
    np.testing.assert_array_equal(np.load(clip_path), make_noise_clip(3, 16, 24, 4))
    assert main(["--manifest", "nope", "--seed", "0", "--out", str(tmp_path / "x.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()


# -- T's two names -------------------------------------------------------------------------------------
def test_config_keeps_t_as_sequence_num_on_disk(official_model):
    cfg = official_model.config
    d = cfg.to_dict()
    assert d["sequence_num"] == cfg.memory_frames == 2 and "memory_frames" not in d  # what checkpoints hold
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({**d, "memory_frames": 2}) == cfg  # the code's name is accepted too
    d.pop("sequence_num")
    assert ModelConfig.from_dict({**d, "memory_frames": 4}).memory_frames == 4
    with pytest.raises(ValueError, match="sequence_num=2 and memory_frames=4 disagree"):
        ModelConfig.from_dict({**d, "sequence_num": 2, "memory_frames": 4})


def test_the_shipped_demo_checkpoint_keeps_loading():
    """tmanet/data/demo_model.pth predates the rename: its config holds T under the on-disk key sequence_num."""
    path = Path(tmanet.__file__).parent / "data" / "demo_model.pth"
    stored = torch.load(path, map_location="cpu", weights_only=True)["config"]
    assert "sequence_num" in stored and "memory_frames" not in stored
    assert load_model(path).config.memory_frames == stored["sequence_num"]


def test_config_overrides_take_either_name_of_t():
    from tmanet.training.config import resolve_config
    assert resolve_config("cityscapes-r50", ["sequence_num=4"])[0].memory_frames == 4
    assert resolve_config("cityscapes-r50", ["memory_frames=3"])[0].memory_frames == 3
