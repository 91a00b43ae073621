"""Split ONNX export: graph contract, manifest, the ORT-vs-torch check and the CLI."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tmanet.checkpoints import save_checkpoint
from tmanet.cli import main
from tmanet.export import ExportCheckError, export_onnx
from tmanet.manifest import ManifestError, load_manifest
from tmanet.presets import ModelConfig
from tmanet.export.onnx_export import check_against_torch, head_input_names

H, W = 64, 128


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def elem_type(value_info):
    return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def static_export(tiny, tmp_path_factory):
    return export_onnx(tiny, tmp_path_factory.mktemp("static"), H, W, batch=2)


@pytest.fixture(scope="module")
def dynamic_export(tiny, tmp_path_factory):
    return export_onnx(tiny, tmp_path_factory.mktemp("dynamic"), H, W, dynamic_batch=True)


def test_graph_contract(static_export, tiny):
    cfg = tiny.config
    T, ck, cv, h, w = cfg.memory_frames, cfg.key_channels, cfg.value_channels, H // 8, W // 8
    enc = onnx.load(static_export / "frame_encoder.onnx")
    assert [(i.name, dims(i), elem_type(i)) for i in enc.graph.input] == [("frames", [2, H, W, 3], np.uint8)]
    assert [(o.name, dims(o)) for o in enc.graph.output] == [
        ("query_key", [2, ck, h, w]), ("query_value", [2, cv, h, w]),
        ("memory_key", [2, T, ck, h, w]), ("memory_value", [2, T, cv, h, w])]
    head = onnx.load(static_export / "memory_head.onnx")
    assert [i.name for i in head.graph.input] == head_input_names(T) == [
        "query_key", "query_value", "memory_key_0", "memory_key_1", "memory_value_0", "memory_value_1"]
    outs = {o.name: (dims(o), elem_type(o)) for o in head.graph.output}
    assert outs == {"mask": ([2, H, W], np.uint8), "logits": ([2, cfg.num_classes, H, W], np.float32)}
    # Weights are embedded: no external-data sidecar to ship.
    assert not list(static_export.glob("*.data"))


def test_manifest(static_export, tiny):
    spec = load_manifest(static_export)
    m = spec.to_dict()  # as written
    cfg = tiny.config
    assert spec.input_size == (H, W) and spec.batch == spec.max_batch == 2 and not spec.dynamic_batch
    assert spec.palette == tuple(tuple(c) for c in cfg.palette) and spec.slide_crop == tuple(cfg.slide_crop)
    assert spec.directory == static_export and type(cfg).from_dict(spec.config) == cfg
    assert m["sequence_num"] == cfg.memory_frames and m["num_classes"] == cfg.num_classes
    assert m["input_size"] == [H, W] and m["feature_size"] == [H // 8, W // 8] and m["batch"] == 2
    assert m["max_batch"] == 2
    assert m["palette"] == [list(c) for c in cfg.palette] and m["class_names"] == list(cfg.class_names)
    assert m["align_corners"] is cfg.align_corners and m["slide_crop"] == list(cfg.slide_crop)
    assert m["precision"] == {"frame_encoder": "fp32", "memory_head": "fp32"}
    assert set(m["files"]) == {"frame_encoder.onnx", "memory_head.onnx"}
    assert {"torch", "onnx", "onnxruntime", "tmanet"} <= set(m["versions"])
    assert m["check"]["relative"] <= m["check"]["tolerance"] and m["check"]["mask_agreement"] == 1.0


def test_a_manifest_written_before_the_rename_still_loads(tmp_path):
    """T is ``memory_frames`` in code and ``sequence_num`` on disk: a manifest as tmanet 0.1 wrote it (before the
    rename) loads with its T, and today's exports still write the old key, so older readers read them."""
    for name, content in (("frame_encoder.onnx", b"encoder"), ("memory_head.onnx", b"head")):
        (tmp_path / name).write_bytes(content)
    old = {"format": "tmanet-trt-onnx/1", "sequence_num": 3, "key_channels": 8, "value_channels": 16,
           "num_classes": 19, "input_size": [32, 64], "feature_size": [4, 8], "batch": 1, "max_batch": 1,
           "config": {"depth": 18, "sequence_num": 3},
           "files": {"frame_encoder.onnx": {"sha256": hashlib.sha256(b"encoder").hexdigest(), "bytes": 7},
                     "memory_head.onnx": {"sha256": hashlib.sha256(b"head").hexdigest(), "bytes": 4}}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    spec = load_manifest(tmp_path, verify=False)  # the fields alone: the files are stand-ins, not graphs
    assert spec.memory_frames == 3 and spec.to_dict()["sequence_num"] == 3
    assert ModelConfig.from_dict(spec.config).memory_frames == 3
    del old["sequence_num"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match="field 'sequence_num' is missing"):
        load_manifest(tmp_path, verify=False)


def test_exports_write_t_under_its_on_disk_key(static_export, tiny):
    written = json.loads((static_export / "manifest.json").read_text())
    assert written["sequence_num"] == tiny.config.memory_frames and "memory_frames" not in written
    assert written["config"]["sequence_num"] == tiny.config.memory_frames and "memory_frames" not in written["config"]


def test_manifest_detects_modified_files(tiny, tmp_path):
    out = export_onnx(tiny, tmp_path / "e", H, W, check=False)
    with open(out / "memory_head.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="memory_head.onnx: SHA256 differs"):
        load_manifest(out)
    (out / "frame_encoder.onnx").unlink()
    with pytest.raises(ManifestError, match="frame_encoder.onnx: missing"):
        load_manifest(out)
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_dynamic_batch_runs_any_batch(dynamic_export, tiny, small_clip):
    enc = onnx.load(dynamic_export / "frame_encoder.onnx")
    assert dims(enc.graph.input[0])[0] == "batch"
    sess = ort.InferenceSession(str(dynamic_export / "frame_encoder.onnx"), providers=["CPUExecutionProvider"])
    encoder, _ = tiny.split((H, W))
    frames = small_clip[:3]
    got = sess.run(None, {"frames": frames})
    with torch.no_grad():
        ref = encoder(torch.from_numpy(frames))
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4)


def test_place_read_exports_and_onnx_runtime_agrees(make_tiny_model, small_clip, tmp_path):
    """The ``place_read`` extension is carried by the memory head graph and ONNX Runtime computes what torch
    does; the check would see a head without it (its projection carries weight here)."""
    placed = make_tiny_model(seed=3, place_read=True)
    out = export_onnx(placed, tmp_path / "placed", H, W, check_frames=small_clip)
    check = load_manifest(out).check
    assert check["relative"] < 1e-4 and check["mask_agreement"] > 0.999
    head = onnx.load(out / "memory_head.onnx")
    assert {"place_proj.weight", "place_proj.bias"} <= {i.name for i in head.graph.initializer}
    assert sum(n.op_type == "Softmax" for n in head.graph.node) == 2  # the official read and the place read
    plain = make_tiny_model(seed=3)
    with pytest.raises(ExportCheckError, match="ONNX Runtime disagrees with torch"):
        check_against_torch(out, *plain.split((H, W)), 2, small_clip, 1, 1e-4)


def test_check_fails_loudly_when_ort_disagrees(static_export, make_tiny_model, small_clip):
    # The ONNX files hold seed-3 weights; a torch model with other weights must be caught.
    other = make_tiny_model(seed=4)
    encoder, head = other.split((H, W))
    with pytest.raises(ExportCheckError, match="ONNX Runtime disagrees with torch"):
        check_against_torch(static_export, encoder, head, 2, small_clip, 2, 1e-4)


def test_check_rejects_frames_of_the_wrong_size(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"check frames must be uint8 \(F, 64, 128, 3\)"):
        export_onnx(tiny, tmp_path, H, W, check_frames=np.zeros((3, 32, 32, 3), np.uint8))


def test_cli_export(tiny, tmp_path, capsys):
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(tiny, ckpt)
    assert main(["export", str(ckpt), "--height", str(H), "--width", str(W), "--out", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["checkpoint"] == str(ckpt.resolve()) and m["batch"] == 1
    assert "exported to" in capsys.readouterr().out


def test_cli_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pth"), "--height", "64", "--width", "128",
                 "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.pth"), "--height", "16", "--width", "128",
                 "--out", str(tmp_path / "o")]) == 2
    assert "at least 32" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.pth"), "--height", "64", "--width", "128", "--query-chunk", "-3",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--query-chunk must be >= 0" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_unchunked_export_loads_and_reads_in_one_chunk(tiny, tmp_path):
    """``query_chunk=0`` (one chunk: the whole score matrix at once) gives an export its manifest accepts."""
    out = export_onnx(tiny, tmp_path / "one", 128, 256, query_chunk=0)  # 512 queries: chunks of 128 would be 4
    assert load_manifest(out).query_chunk == 0
    assert sum(n.op_type == "Softmax" for n in onnx.load(out / "memory_head.onnx").graph.node) == 1
    chunked = export_onnx(tiny, tmp_path / "four", 128, 256, query_chunk=128)
    assert sum(n.op_type == "Softmax" for n in onnx.load(chunked / "memory_head.onnx").graph.node) == 4
