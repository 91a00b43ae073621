"""TensorRT engines: the version/recipe logic, engine metadata, clean failure without TensorRT, and (on a
machine with TensorRT and a CUDA GPU) real builds checked against the ONNX Runtime backend."""
from __future__ import annotations

import hashlib
import json
import sys
import types

import numpy as np
import onnx
import pytest

from tmanet.cli import main
from tmanet.errors import UserError
from tmanet.engines.build import (DEFAULT_DYNAMIC_BATCH, TensorRTNotInstalled, build_engines, calibration_feeds,
                                  onnx_input_shapes, parse_batch, profile_shapes, require_tensorrt, resolve_batch)
from tmanet.engines.metadata import (EngineIntegrityError, is_up_to_date, load_engine_metadata,
                                     make_engines_manifest, make_metadata, read_engines_manifest, read_metadata,
                                     sidecar_path, verify_engine_file, write_engines_manifest, write_metadata)
from tmanet.engines.versioning import (EngineCompatibilityError, build_plan, check_compatible,
                                       format_compute_capability, parse_trt_version)
from tmanet.manifest import sha256_file

H, W = 64, 128
TRT_SENTENCE = "TensorRT is not installed: "


# -- versions and build recipes ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("10.3.0.26", (10, 3, 0)), ("11.0.1", (11, 0, 1)), ("10.0.0b6", (10, 0, 0)), ("10.3", (10, 3, 0)),
    ("v10.13.2.6", (10, 13, 2)), ((10, 8, 0, 43), (10, 8, 0)),
])
def test_parse_trt_version(text, expected):
    assert parse_trt_version(text) == expected


@pytest.mark.parametrize("bad", ["", "tensorrt", "x10.1"])
def test_parse_trt_version_rejects(bad):
    with pytest.raises(ValueError, match="not a TensorRT version"):
        parse_trt_version(bad)


@pytest.mark.parametrize("version", ["11.0.1", "11.4.0.3", "12.0.0"])
@pytest.mark.parametrize("precision, expected", [("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8"),
                                                 ("int8-qdq", "int8"), ("float16", "fp16")])
def test_plan_trt11_is_strongly_typed_from_the_graph(version, precision, expected):
    plan = build_plan(version, precision)
    assert (plan.strongly_typed, plan.fp16_flag, plan.int8_flag, plan.precision) == (True, False, False, expected)
    assert version.split(".")[0] in plan.reason and "strongly typed" in plan.reason


@pytest.mark.parametrize("weak", ["fp16", "int8"])
def test_plan_trt11_refuses_weak_flags(weak):
    with pytest.raises(UserError, match=rf"--weak-{weak} needs TensorRT 10\.x: TensorRT 11\.0\.1 removed"):
        build_plan("11.0.1", "fp32", weak)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_trt10_default_is_strongly_typed(precision):
    plan = build_plan("10.3.0.26", precision)
    assert (plan.strongly_typed, plan.fp16_flag, plan.int8_flag, plan.precision) == (True, False, False, precision)


def test_plan_trt10_weak_flags_on_fp32_graph():
    fp16 = build_plan("10.3.0", "fp32", "fp16")
    assert (fp16.strongly_typed, fp16.fp16_flag, fp16.int8_flag, fp16.precision) == (False, True, False, "fp16-weak")
    int8 = build_plan("10.3.0", "fp32", "INT8")
    # Weak INT8 keeps FP16 on so that layers without INT8 kernels fall back to FP16.
    assert (int8.strongly_typed, int8.fp16_flag, int8.int8_flag, int8.precision) == (False, True, True, "int8-weak")


@pytest.mark.parametrize("graph", ["fp16", "int8"])
def test_plan_weak_flags_need_an_fp32_graph(graph):
    with pytest.raises(UserError, match=f"applies to an FP32 graph, but this ONNX is {graph}"):
        build_plan("10.3.0", graph, "fp16")


@pytest.mark.parametrize("args, message", [
    (("8.6.1", "fp32"), "TensorRT 8.6.1 is not supported: tmanet needs TensorRT 10 or newer"),
    (("9.3.0", "fp16"), "TensorRT 9.3.0 is not supported"),
    (("10.3.0", "bf17"), "unknown ONNX precision 'bf17'"),
    (("10.3.0", "fp32", "fp8"), "unknown weak precision 'fp8'"),
])
def test_plan_rejects(args, message):
    with pytest.raises(UserError, match=message):
        build_plan(*args)


@pytest.mark.parametrize("cc, expected", [((8, 7), "sm_87"), ("9.0", "sm_90"), ("sm_89", "sm_89"), (87, "sm_87"),
                                          ("SM_120", "sm_120"), ((12, 0), "sm_120")])
def test_compute_capability_forms(cc, expected):
    assert format_compute_capability(cc) == expected


ORIN_META = {"engine": "frame_encoder", "tensorrt_version": "10.3.0",
             "gpu": {"name": "Orin", "compute_capability": "sm_87"}}


def test_compatible_says_which_part_differs():
    with pytest.raises(EngineCompatibilityError) as both:
        check_compatible(ORIN_META, "11.0.1", "NVIDIA H100", (9, 0))
    assert str(both.value) == (
        "TensorRT version and GPU differ for frame_encoder: engine built with TensorRT 10.3.0 on Orin (sm_87); "
        "this machine has TensorRT 11.0.1 on NVIDIA H100 (sm_90): rebuild with `tmanet build`")
    with pytest.raises(EngineCompatibilityError, match=r"^TensorRT version differs for frame_encoder: .*10\.3\.0 "
                                                       r"on Orin \(sm_87\); this machine has TensorRT 10\.8\.0 on "
                                                       r"Jetson AGX Orin \(sm_87\)"):
        check_compatible(ORIN_META, "10.8.0.43", "Jetson AGX Orin", "8.7")
    with pytest.raises(EngineCompatibilityError, match=r"^GPU differs for frame_encoder: .*this machine has "
                                                       r"TensorRT 10\.3\.0 on NVIDIA RTX 4090 \(sm_89\)"):
        check_compatible(ORIN_META, "10.3.0.30", "NVIDIA RTX 4090", "sm_89")


def test_compatible_same_release_and_capability_runs():
    # A different build number of the same release and the same GPU: nothing to say.
    assert check_compatible(ORIN_META, "10.3.0.30", "Orin", (8, 7)) == []
    # Another GPU model of the same compute capability runs, with a warning about tactics.
    warnings = check_compatible(ORIN_META, "10.3.0", "Jetson AGX Orin 64GB", "sm_87")
    assert len(warnings) == 1 and "Orin" in warnings[0] and "Jetson AGX Orin 64GB" in warnings[0]


# -- metadata --------------------------------------------------------------------------------------------------
def fake_engine(directory, name="frame_encoder", payload=b"serialized engine bytes " * 40, **changes):
    """An engine file with its sidecar, as `tmanet build` writes them (the bytes are not a real plan)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.engine"
    path.write_bytes(payload)
    onnx_file = directory / f"{name}.onnx"
    fields = dict(
        engine=name, engine_file=path, engine_sha256=sha256_file(path), engine_bytes=path.stat().st_size,
        tensorrt_version="10.3.0.26", gpu_name="Orin", compute_capability=(8, 7), precision="fp16",
        build_plan=build_plan("10.3.0", "fp16").to_dict(),
        io={"frames": {"mode": "input", "dtype": "uint8", "shape": [-1, H, W, 3],
                       "profile": {"min": [1, H, W, 3], "opt": [2, H, W, 3], "max": [4, H, W, 3]}}},
        batch=(1, 2, 4), source_onnx=onnx_file, source_sha256="ab" * 32,
        build_options={"workspace_gb": 2.0, "timing_cache": "/tmp/cache", "tf32": False}, build_seconds=12.34567)
    fields.update(changes)
    meta = make_metadata(**fields)
    write_metadata(path, meta)
    return path, meta


def test_metadata_round_trip(tmp_path):
    path, meta = fake_engine(tmp_path)
    assert sidecar_path(path).name == "frame_encoder.engine.json"
    back = read_metadata(path)
    assert back == meta
    assert back["tensorrt_version"] == "10.3.0" and back["tensorrt_version_full"] == "10.3.0.26"
    assert back["gpu"] == {"name": "Orin", "compute_capability": "sm_87"}
    assert back["batch"] == {"min": 1, "opt": 2, "max": 4, "dynamic": True}
    assert back["source_onnx"] == {"file": "frame_encoder.onnx", "sha256": "ab" * 32}
    assert back["build_seconds"] == 12.346 and back["build_plan"]["strongly_typed"] is True
    from tmanet import __version__
    assert back["tmanet_version"] == __version__
    verify_engine_file(path, back)  # the file is the one described


def test_verify_engine_detects_changed_and_truncated_files(tmp_path):
    path, meta = fake_engine(tmp_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF   # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(EngineIntegrityError, match=r"does not match its metadata \(sha256 .*rebuild"):
        verify_engine_file(path, meta)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(EngineIntegrityError, match=f"has {len(data) - 10} bytes, its metadata says {len(data)}"):
        verify_engine_file(path, meta)
    path.unlink()
    with pytest.raises(EngineIntegrityError, match="is missing"):
        verify_engine_file(path, meta)


def test_read_metadata_rejects_missing_and_foreign_sidecars(tmp_path):
    path, meta = fake_engine(tmp_path)
    sidecar = sidecar_path(path)
    sidecar.write_text(json.dumps({**meta, "schema": 99}))
    with pytest.raises(EngineIntegrityError, match="schema 99"):
        read_metadata(path)
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("gpu", "io")}))
    with pytest.raises(EngineIntegrityError, match="lacks gpu, io"):
        read_metadata(path)
    sidecar.write_text("{not json")
    with pytest.raises(EngineIntegrityError, match="not readable JSON"):
        read_metadata(path)
    sidecar.unlink()
    with pytest.raises(EngineIntegrityError, match="frame_encoder.engine.json is missing"):
        read_metadata(path)


def test_up_to_date_compares_everything_but_the_cache_location(tmp_path):
    _, meta = fake_engine(tmp_path)
    same = dict(onnx_sha256="ab" * 32, tensorrt_version="10.3.0.30", compute_capability="8.7",
                build_plan=build_plan("10.3.0", "fp16").to_dict(), batch=(1, 2, 4),
                build_options={"workspace_gb": 2.0, "timing_cache": "elsewhere.cache", "tf32": False})
    assert is_up_to_date(meta, **same)
    changed = [("onnx_sha256", "cd" * 32), ("tensorrt_version", "10.4.0"), ("compute_capability", (9, 0)),
               ("build_plan", build_plan("10.3.0", "fp32", "fp16").to_dict()), ("batch", (1, 2, 8)),
               ("build_options", {"workspace_gb": 4.0, "timing_cache": None, "tf32": False})]
    for key, value in changed:
        assert not is_up_to_date(meta, **{**same, key: value}), key


def test_engines_manifest_ties_the_set_together(tmp_path):
    metas = {}
    for name in ("frame_encoder", "memory_head"):
        _, metas[name] = fake_engine(tmp_path, name, payload=name.encode() * 100)
    onnx_manifest = {"format": "tmanet-trt-onnx/1", "sequence_num": 2}
    write_engines_manifest(tmp_path, make_engines_manifest(metas, onnx_manifest, tmp_path))
    manifest = read_engines_manifest(tmp_path)
    assert manifest["onnx_manifest"] == onnx_manifest
    assert manifest["engines"]["memory_head"]["sha256"] == sha256_file(tmp_path / "memory_head.engine")
    path, meta = load_engine_metadata(tmp_path, "memory_head")
    assert path.name == "memory_head.engine" and meta == metas["memory_head"]
    # A sidecar from another build next to this manifest: the set is mixed.
    fake_engine(tmp_path, "memory_head", payload=b"another build" * 100)
    with pytest.raises(EngineIntegrityError, match="disagree on memory_head's SHA256"):
        load_engine_metadata(tmp_path, "memory_head")
    with pytest.raises(EngineIntegrityError, match="has no engines.json"):
        read_engines_manifest(tmp_path / "nowhere")


# -- batch profiles ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("4", (4, 4, 4)), ("1,2,8", (1, 2, 8)), (" 1, 1, 1", (1, 1, 1)),
                                            ((2, 4, 4), (2, 4, 4)), (3, (3, 3, 3))])
def test_parse_batch(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize("bad", ["0", "4,2,8", "1,2", "a,b,c", "1,2,3,4"])
def test_parse_batch_rejects(bad):
    with pytest.raises(UserError, match="--batch"):
        parse_batch(bad)


def test_resolve_batch():
    assert resolve_batch("dynamic") == DEFAULT_DYNAMIC_BATCH
    assert resolve_batch("dynamic", "2,4,16") == (2, 4, 16)
    assert resolve_batch("dynamic", "1,4,64", max_batch=64) == (1, 4, 64)
    with pytest.raises(UserError, match="beyond this export's maximum batch of 8"):
        resolve_batch("dynamic", "1,4,16", max_batch=8)
    with pytest.raises(UserError, match="maximum batch of 64"):
        resolve_batch("dynamic", "1,1,65")  # exports without max_batch allowed 64
    assert resolve_batch(2) == (2, 2, 2)
    assert resolve_batch(2, "2") == (2, 2, 2)
    with pytest.raises(UserError, match="fixed batch of 2, so --batch 1,2,4 cannot apply"):
        resolve_batch(2, "1,2,4")


def test_profile_shapes_from_onnx(tmp_path):
    """A dynamic batch dim takes the profile; the other dims stay; a dynamic spatial dim is refused."""
    def graph(path, dims):
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims)
        model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])],
                                                              "g", [x], [y]))
        onnx.save(model, path)
        return path
    shapes = onnx_input_shapes(graph(tmp_path / "d.onnx", ["batch", 16, 8, 16]))
    assert shapes == {"x": [None, 16, 8, 16]}
    assert profile_shapes(shapes, (1, 2, 8)) == {"x": ((1, 16, 8, 16), (2, 16, 8, 16), (8, 16, 8, 16))}
    with pytest.raises(UserError, match="dynamic dimension other than the batch"):
        profile_shapes(onnx_input_shapes(graph(tmp_path / "s.onnx", [1, 16, "h", 16])), (1, 1, 1))
    fixed = onnx_input_shapes(graph(tmp_path / "f.onnx", [2, 16, 8, 16]))
    assert profile_shapes(fixed, (2, 2, 2)) == {"x": ((2, 16, 8, 16),) * 3}
    with pytest.raises(UserError, match="fixed batch 2"):
        profile_shapes(fixed, (1, 2, 4))


# -- a tiny real export --------------------------------------------------------------------------------------------
def test_export_profiles(tiny_export):
    """The real export's inputs give the profile shapes the build would use."""
    from tmanet.manifest import load_manifest
    m = load_manifest(tiny_export)
    h, w = m.feature_size
    enc = profile_shapes(onnx_input_shapes(tiny_export / "frame_encoder.onnx"), resolve_batch(m.batch_setting))
    assert enc == {"frames": ((1, H, W, 3),) * 3}
    head = profile_shapes(onnx_input_shapes(tiny_export / "memory_head.onnx"), (1, 1, 1))
    assert list(head) == ["query_key", "query_value", "memory_key_0", "memory_key_1", "memory_value_0",
                          "memory_value_1"]
    assert head["memory_value_1"][0] == (1, m.value_channels, h, w)


def test_calibration_feeds_follow_the_streaming_memory_rule(tiny_export, small_clip):
    """Head calibration inputs are what the head sees when streaming: slot i of frame t holds the frame encoder's
    slot-i encoding of frame max(t-T+i, 0)."""
    import onnxruntime as ort
    from tmanet.manifest import load_manifest
    m = load_manifest(tiny_export)
    enc_feeds, head_feeds = calibration_feeds(tiny_export, m, small_clip, batch=1)
    assert len(enc_feeds) == len(small_clip)
    assert all(np.array_equal(f["frames"][0], small_clip[t]) for t, f in enumerate(enc_feeds))
    sess = ort.InferenceSession(str(tiny_export / "frame_encoder.onnx"), providers=["CPUExecutionProvider"])
    ref = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"frames": small_clip[t:t + 1]})))
           for t in range(len(small_clip))]
    feeds = list(head_feeds())
    assert len(feeds) == len(small_clip)
    for t, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["query_key"], ref[t]["query_key"])
        for i in range(2):
            src = max(t - 2 + i, 0)
            np.testing.assert_array_equal(feed[f"memory_key_{i}"], ref[src]["memory_key"][:, i])
            np.testing.assert_array_equal(feed[f"memory_value_{i}"], ref[src]["memory_value"][:, i])
    # Two streams: the clip is cut in two consecutive halves, one per batch row.
    enc2, _ = calibration_feeds(tiny_export, m, small_clip, batch=2)
    assert len(enc2) == 2 and np.array_equal(enc2[1]["frames"][1], small_clip[3])


# -- without TensorRT -------------------------------------------------------------------------------------------
@pytest.fixture
def no_tensorrt(monkeypatch):
    """`import tensorrt` fails here, whether or not this machine has TensorRT."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A `tensorrt` module that only has a version: enough to reach the recipe checks, never a build."""
    def install(version):
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    return install


def test_require_tensorrt_without_tensorrt(no_tensorrt):
    with pytest.raises(TensorRTNotInstalled) as e:
        require_tensorrt()
    text = str(e.value)
    assert text.startswith(TRT_SENTENCE) and "--backend ort" in text and "\n" not in text


def test_require_tensorrt_too_old(fake_tensorrt):
    fake_tensorrt("8.6.1.6")
    with pytest.raises(TensorRTNotInstalled, match="found TensorRT 8.6.1.6, tmanet needs 10 or newer"):
        require_tensorrt()


def test_cli_build_without_tensorrt(tiny_export, no_tensorrt, capsys):
    before = sorted(p.name for p in tiny_export.iterdir())
    assert main(["build", str(tiny_export), "--batch", "1"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tmanet build: error: {TRT_SENTENCE}")
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(p.name for p in tiny_export.iterdir()) == before   # nothing written


def test_build_refuses_a_cpu_target_export(tiny_export, tmp_path, capsys):
    """A `tmanet calibrate --target cpu` export is ONNX Runtime's Q/DQ placement: refused in one sentence,
    whether TensorRT is installed or not, nothing written."""
    import json
    import shutil
    cpu = tmp_path / "cpu"
    shutil.copytree(tiny_export, cpu)
    manifest = json.loads((cpu / "manifest.json").read_text())
    manifest.update(target="cpu", precision={"frame_encoder": "int8", "memory_head": "int8"})
    (cpu / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in cpu.iterdir())
    assert main(["build", str(cpu)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (
        f"tmanet build: error: {cpu} was quantized for ONNX Runtime's CPU kernels (tmanet calibrate --target cpu); "
        "TensorRT wants the ModelOpt Q/DQ placement: calibrate the fp32 export with --target trt")
    assert sorted(p.name for p in cpu.iterdir()) == before
    manifest["target"] = "arm"
    (cpu / "manifest.json").write_text(json.dumps(manifest))
    from tmanet.manifest import ManifestError, load_manifest
    with pytest.raises(ManifestError, match="field 'target' must be one of trt, cpu"):
        load_manifest(cpu, verify=False)


def test_build_api_without_tensorrt(tiny_export, no_tensorrt):
    with pytest.raises(TensorRTNotInstalled, match=f"^{TRT_SENTENCE}"):
        build_engines(tiny_export)


def test_segmenter_trt_backend_without_tensorrt(tiny_export, no_tensorrt):
    from tmanet.runtime.backends import BackendUnavailable
    from tmanet.runtime.segmenter import StreamingSegmenter
    with pytest.raises(BackendUnavailable) as e:
        StreamingSegmenter.open(tiny_export, backend="trt", device="cuda")
    assert str(e.value).startswith(TRT_SENTENCE)
    assert isinstance(e.value, UserError)   # the CLI prints it as one line too


@pytest.mark.parametrize("argv, message", [
    (["--weak-fp16"], "--weak-fp16 needs TensorRT 10.x: TensorRT 11.0.1 removed weakly typed precision flags"),
    (["--batch", "1,2,4"], "fixed batch of 1, so --batch 1,2,4 cannot apply"),
    (["--calib-frames", "x.npy"], "--calib-frames is for --weak-int8"),
    (["--workspace", "0"], "--workspace must be a positive number"),
])
def test_cli_build_user_errors_before_any_build(tiny_export, fake_tensorrt, capsys, argv, message):
    """With TensorRT 11 present (only its version is needed), bad requests stop with one line, nothing built."""
    fake_tensorrt("11.0.1")
    assert main(["build", str(tiny_export), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tmanet build: error: ") and message in err
    assert not list(tiny_export.glob("*.engine*")) and not (tiny_export / "engines.json").exists()


def test_weak_int8_needs_calibration_frames(tiny_export, fake_tensorrt):
    fake_tensorrt("10.3.0")
    with pytest.raises(UserError, match="--weak-int8 calibrates INT8 ranges on real frames"):
        build_engines(tiny_export, weak_precision="int8")
    with pytest.raises(UserError, match=r"calibration frames must be uint8 \(F, 64, 128, 3\)"):
        build_engines(tiny_export, weak_precision="int8", calib_frames=np.zeros((4, 32, 32, 3), np.uint8))


class StandInBuilder:
    """Polygraphy's TensorRT loaders replaced by stand-ins: the network is read from the ONNX graph, the
    'engine' is bytes derived from the ONNX file and the recipe. It checks build_engines' orchestration (what
    it asks the builder for, what it writes, when it skips, what a failure leaves) where TensorRT is absent."""

    def __init__(self, monkeypatch, version="10.3.0.26"):
        import polygraphy.backend.trt as pt
        from polygraphy.exception import PolygraphyException
        self.calls, self.fail = [], None
        trt = types.SimpleNamespace(__version__=version, MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"))
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr("tmanet.engines.build.current_gpu", lambda: ("Stand-in GPU", "sm_90"))
        stand_in = self

        def tensor(value_info):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]
            dtype = {1: "FLOAT", 2: "UINT8", 10: "HALF"}[value_info.type.tensor_type.elem_type]
            return types.SimpleNamespace(name=value_info.name, dtype=types.SimpleNamespace(name=dtype), shape=dims)

        def network_from_onnx(path, strongly_typed=False):
            graph = onnx.load(path, load_external_data=False).graph
            ins, outs = [tensor(i) for i in graph.input], [tensor(o) for o in graph.output]
            net = types.SimpleNamespace(num_inputs=len(ins), get_input=ins.__getitem__, num_outputs=len(outs),
                                        get_output=outs.__getitem__, path=path, strongly_typed=strongly_typed)
            return lambda: ("builder", net, "parser")

        class Profile(dict):
            def add(self, name, min, opt, max):
                self[name] = (min, opt, max)
                return self

        def engine_bytes(network, config=None, save_timing_cache=None):
            _, net, _ = network
            def build():
                name = net.path.rsplit("/", 1)[-1]
                stand_in.calls.append({"onnx": name, "strongly_typed": net.strongly_typed, **config})
                if stand_in.fail == name:
                    raise PolygraphyException("stand-in builder failure")
                if isinstance(stand_in.fail, tuple) and stand_in.fail[0] == name:
                    raise stand_in.fail[1]
                return (name.encode() + repr(sorted(config.items(), key=str)).encode()) * 50
            return build

        monkeypatch.setattr(pt, "NetworkFromOnnxPath", network_from_onnx)
        monkeypatch.setattr(pt, "CreateConfig", lambda **kw: {k: v for k, v in kw.items() if v is not None})
        monkeypatch.setattr(pt, "EngineBytesFromNetwork", engine_bytes)
        monkeypatch.setattr(pt, "Profile", Profile)
        monkeypatch.setattr(pt, "Calibrator", lambda data: ("calibrator", calibration_batches(data)))


def calibration_batches(data):
    """What Polygraphy's Calibrator (>= 0.49.10) lets through: it declares every non-index input float32 (the
    only type TensorRT calibrates; uint8 frames included) and drops a batch of any other dtype, which leaves
    TensorRT with no batch and no scaling factors. The stand-in fails loudly instead."""
    for batch in data:
        for name, array in batch.items():
            assert array.dtype in (np.float32, np.int32, np.int64, np.bool_), \
                f"calibration input {name} is {array.dtype}: Polygraphy rejects it (float32 only)"
        yield batch


def test_build_orchestration(tiny_export, tmp_path, monkeypatch):
    builder = StandInBuilder(monkeypatch)
    out = tmp_path / "engines"
    result = build_engines(tiny_export, out_dir=out, workspace_gb=1.5, progress=False)
    assert [c["onnx"] for c in builder.calls] == ["frame_encoder.onnx", "memory_head.onnx"]
    for call in builder.calls:   # TensorRT 10, FP32 export: strongly typed, no weak flags, fixed batch (no profile)
        assert call["strongly_typed"] and "fp16" not in call and "int8" not in call and "profiles" not in call
        assert call["memory_pool_limits"] == {"ws": int(1.5 * (1 << 30))}
    assert sorted(p.name for p in out.iterdir()) == [
        "engines.json", "frame_encoder.engine", "frame_encoder.engine.json", "memory_head.engine",
        "memory_head.engine.json"]
    manifest = read_engines_manifest(out)
    assert manifest == result and manifest["onnx_manifest"]["files"] == json.loads(
        (tiny_export / "manifest.json").read_text())["files"]
    _, meta = load_engine_metadata(out, "memory_head")   # the sidecar matches the file written
    assert meta["gpu"] == {"name": "Stand-in GPU", "compute_capability": "sm_90"}
    assert meta["source_onnx"]["sha256"] == sha256_file(tiny_export / "memory_head.onnx")
    assert meta["io"]["memory_value_1"]["shape"][1] == 32 and meta["io"]["mask"]["dtype"] == "uint8"
    assert meta["io"]["logits"] == {"mode": "output", "dtype": "float32", "shape": [1, 19, H, W]}
    # Nothing changed: both engines are kept and engines.json is left as it was (bytes and mtime: its
    # written_at is the engines' build time, not the clock); a different workspace rebuilds them.
    listed = out / "engines.json"
    bytes_before, mtime_before = listed.read_bytes(), listed.stat().st_mtime_ns
    build_engines(tiny_export, out_dir=out, workspace_gb=1.5, progress=False)
    assert len(builder.calls) == 2
    assert listed.read_bytes() == bytes_before and listed.stat().st_mtime_ns == mtime_before
    assert manifest["written_at"] == max(m["built_at"] for m in (read_metadata(out / f"{n}.engine")
                                                               for n in ("frame_encoder", "memory_head")))
    before = {n: sha256_file(out / f"{n}.engine") for n in ("frame_encoder", "memory_head")}
    # Polygraphy/TensorRT API mismatches (e.g. an old Polygraphy on TensorRT 11) are one clear build error too.
    for error in (AttributeError("'IBuilderConfig' object has no attribute 'int8_calibrator'"),
                  TypeError("progress_monitor"), RuntimeError("out of memory")):
        builder.fail = ("frame_encoder.onnx", error)
        with pytest.raises(UserError, match=f"TensorRT could not build frame_encoder .*{type(error).__name__}: "):
            build_engines(tiny_export, out_dir=out, workspace_gb=2, progress=False)
    builder.fail, builder.calls = None, builder.calls[:2]
    # A failure in the second engine leaves the previous set in place, with no partial files.
    builder.fail = "memory_head.onnx"
    with pytest.raises(UserError, match="TensorRT could not build memory_head from .*stand-in builder failure"):
        build_engines(tiny_export, out_dir=out, workspace_gb=3, progress=False)
    assert {n: sha256_file(out / f"{n}.engine") for n in before} == before
    assert read_engines_manifest(out) == manifest and not list(out.glob(".*"))
    builder.fail = None
    build_engines(tiny_export, out_dir=out, workspace_gb=3, progress=False)
    assert len(builder.calls) == 6 and sha256_file(out / "frame_encoder.engine") != before["frame_encoder"]
    load_engine_metadata(out, "frame_encoder")


def test_build_dynamic_profile_and_weak_int8(make_tiny_model, tmp_path, monkeypatch, small_clip):
    """A dynamic-batch export gets one profile over the batch; TensorRT 10 weak INT8 sets INT8+FP16 on a weakly
    typed network and calibrates each engine on its own inputs."""
    from tmanet.export import export_onnx
    export = export_onnx(make_tiny_model(seed=5), tmp_path / "dyn", H, W, dynamic_batch=True, check=False)
    builder = StandInBuilder(monkeypatch, "10.3.0")
    build_engines(export, batch="1,2,3", weak_precision="int8", calib_frames=small_clip, progress=False)
    enc, head = builder.calls
    for call in (enc, head):
        assert not call["strongly_typed"] and call["fp16"] and call["int8"]
        (profile,) = call["profiles"]
        assert all(s[0][0] == 1 and s[1][0] == 2 and s[2][0] == 3 for s in profile.values())
    assert enc["profiles"][0]["frames"] == ((1, H, W, 3), (2, H, W, 3), (3, H, W, 3))
    assert len(head["profiles"][0]) == 6
    # Calibration at the opt batch (2 streams of 2 frames): frames for the encoder, streamed features for the head.
    enc_data, head_data = list(enc["calibrator"][1]), list(head["calibrator"][1])
    assert [f["frames"].shape for f in enc_data] == [(2, H, W, 3)] * 2
    # The frames' values, as float32: streams of 2 consecutive frames (clip frames 0,1 and 2,3).
    np.testing.assert_array_equal(enc_data[1]["frames"], small_clip[[1, 3]].astype(np.float32))
    assert len(head_data) == 2 and head_data[0]["memory_key_0"].shape == (2, 16, H // 8, W // 8)
    meta = read_metadata(export / "frame_encoder.engine")
    assert meta["precision"] == "int8-weak" and meta["batch"] == {"min": 1, "opt": 2, "max": 3, "dynamic": True}
    assert meta["io"]["frames"]["profile"] == {"min": [1, H, W, 3], "opt": [2, H, W, 3], "max": [3, H, W, 3]}
    assert meta["build_options"]["calibration_frames"] == 4
    assert meta["build_options"]["calibration_sha256"] == hashlib.sha256(small_clip.tobytes()).hexdigest()
    # Same request: kept. Other calibration frames: both engines rebuilt.
    build_engines(export, batch="1,2,3", weak_precision="int8", calib_frames=small_clip, progress=False)
    assert len(builder.calls) == 2
    build_engines(export, batch="1,2,3", weak_precision="int8", calib_frames=small_clip[::-1].copy(), progress=False)
    assert len(builder.calls) == 4


def test_trt_backend_device_names():
    from tmanet.engines.backend import TrtBackendError, _cuda_device_name
    assert _cuda_device_name("cpu") == _cuda_device_name(None) == _cuda_device_name("cuda") == "cuda:0"
    assert _cuda_device_name("cuda:1") == "cuda:1" and _cuda_device_name("1") == "cuda:1"
    with pytest.raises(TrtBackendError, match="runs on a CUDA device"):
        _cuda_device_name("mps")


# -- with TensorRT and a GPU ----------------------------------------------------------------------------------------
def _need_trt_gpu():
    pytest.importorskip("tensorrt", reason="needs TensorRT (the 'tensorrt' Python module is not installed)")
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def trt_engines(tiny_export, tmp_path_factory):
    """FP32 engines of the tiny export, built into a separate directory."""
    _need_trt_gpu()
    out = tmp_path_factory.mktemp("engines")
    build_engines(tiny_export, out_dir=out, timing_cache=out / "timing.cache", progress=False)
    return out


def _run(export_dir, backend, clip, **options):
    from tmanet.runtime.segmenter import StreamingSegmenter
    with StreamingSegmenter.open(export_dir, backend=backend, return_logits=True, **options) as seg:
        results = [seg.push(frame) for frame in clip]
    return np.stack([r.mask for r in results]), np.stack([r.logits for r in results])


@pytest.mark.tensorrt
def test_trt_build_writes_metadata(trt_engines, tiny_export):
    _need_trt_gpu()
    import tensorrt as trt
    manifest = read_engines_manifest(trt_engines)
    for name in ("frame_encoder", "memory_head"):
        path, meta = load_engine_metadata(trt_engines, name)
        assert meta["precision"] == "fp32" and meta["build_plan"]["strongly_typed"]
        assert meta["tensorrt_version"] == ".".join(trt.__version__.split(".")[:3])
        assert meta["source_onnx"]["sha256"] == sha256_file(tiny_export / f"{name}.onnx")
        assert manifest["engines"][name]["sha256"] == sha256_file(path)
    assert (trt_engines / "timing.cache").stat().st_size > 0
    # A second build with nothing changed keeps the engines (same bytes, no rebuild).
    before = sha256_file(trt_engines / "memory_head.engine")
    build_engines(tiny_export, out_dir=trt_engines, progress=False)
    assert sha256_file(trt_engines / "memory_head.engine") == before


@pytest.mark.tensorrt
def test_trt_matches_ort_and_graphs_change_nothing(trt_engines, tiny_export, small_clip):
    _need_trt_gpu()
    clip = np.concatenate([small_clip, small_clip[::-1]])   # 8 frames: every ring phase twice (T+1 = 3)
    ort_masks, ort_logits = _run(tiny_export, "ort", clip)
    masks, logits = _run(tiny_export, "trt", clip, engine_dir=trt_engines, cuda_graphs=False)
    g_masks, g_logits = _run(tiny_export, "trt", clip, engine_dir=trt_engines, cuda_graphs=True)
    np.testing.assert_allclose(logits, ort_logits, atol=1e-2, rtol=0)
    assert (masks == ort_masks).mean() >= 0.999
    np.testing.assert_array_equal(g_logits, logits)
    np.testing.assert_array_equal(g_masks, masks)


@pytest.mark.tensorrt
def test_trt_bench_reports_trtexec_like_numbers(trt_engines, tiny_export):
    _need_trt_gpu()
    from tmanet.runtime.bench import run_bench
    for graphs in (False, True):
        r = run_bench(tiny_export, backend="trt", device="cuda", frames=10, warmup=3, progress=False,
                      backend_options={"engine_dir": trt_engines, "cuda_graphs": graphs})
        assert ("CUDA graphs on" in r["backend_detail"]) is graphs and r["streams"] == 1 and r["frames"] == 10
        device = r["device_timing_ms"]
        for key in ("gpu_compute_ms", "frame_encoder_ms", "memory_head_ms", "h2d_ms", "d2h_ms", "enqueue_ms"):
            assert 0 < device[key]["min"] <= device[key]["p50"] <= device[key]["max"], key
        # The stages end with a device synchronisation: each holds at least its engine's GPU time.
        assert r["stages_ms"]["frame_engine"]["p50"] >= 0.9 * device["frame_encoder_ms"]["p50"]
        assert r["latency_ms"]["p50"] >= device["gpu_compute_ms"]["p50"]
        assert r["fps"] > 0 and 0 < r["roofline"]["frame_engine"]["fraction_of_peak"]


@pytest.mark.tensorrt
def test_trt_refuses_a_tampered_engine(trt_engines, tiny_export, tmp_path):
    _need_trt_gpu()
    import shutil
    copy = tmp_path / "engines"
    shutil.copytree(trt_engines, copy)
    data = bytearray((copy / "frame_encoder.engine").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "frame_encoder.engine").write_bytes(bytes(data))
    from tmanet.runtime.segmenter import StreamingSegmenter
    with pytest.raises(EngineIntegrityError, match="does not match its metadata"):
        StreamingSegmenter.open(tiny_export, backend="trt", engine_dir=copy)


# -- the TensorRT backend's run loop, with stand-ins for TensorRT's context and torch's CUDA graphs ----------------
class StandInCuda:
    """An execution context and torch.cuda's graph capture, logging what runs: 'enqueue' (eager),
    'enqueue in capture', 'capture', 'replay'. ``fail_in_capture``: the enqueue returns False inside a
    capture; ``invalidate``: the capture raises at its end, as torch does when a capture was invalidated."""

    def __init__(self):
        self.log, self.capturing, self.fail_in_capture, self.invalidate, self.modes = [], False, False, False, []
        stand_in = self

        class Graph:
            def replay(self):
                stand_in.log.append("replay")

        class Capture:
            def __init__(self, graph, stream=None, capture_error_mode="global"):
                stand_in.modes.append(capture_error_mode)

            def __enter__(self):
                stand_in.log.append("capture")
                stand_in.capturing = True

            def __exit__(self, *exc):
                stand_in.capturing = False
                if stand_in.invalidate:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        self.torch = types.SimpleNamespace(cuda=types.SimpleNamespace(CUDAGraph=Graph, graph=Capture))
        self.context = types.SimpleNamespace(execute_async_v3=self.execute, set_input_shape=lambda name, shape: True)

    def execute(self, stream):
        self.log.append("enqueue in capture" if self.capturing else "enqueue")
        return not (self.capturing and self.fail_in_capture)

    def engine(self):
        from tmanet.engines.backend import TrtEngine
        engine = TrtEngine.__new__(TrtEngine)
        engine.torch, engine.context, engine.name = self.torch, self.context, "memory_head"
        engine.stream = types.SimpleNamespace(cuda_stream=7)
        engine.inputs = {"x": {"shape": (-1, 4), "profile": [(1, 4), (2, 4), (4, 4)]}}
        engine._reset_run_state()
        return engine


def test_trt_graphs_capture_thread_local_then_replay():
    cuda = StandInCuda()
    engine = cuda.engine()
    engine.set_batch(1)
    for _ in range(3):
        engine.run(use_graph=True)
    assert cuda.log == ["enqueue", "capture", "enqueue in capture", "replay", "replay"]
    assert cuda.modes == ["thread_local"]   # as trtexec: other threads' CUDA calls cannot invalidate it


@pytest.mark.parametrize("failure", ["fail_in_capture", "invalidate"])
def test_trt_failed_capture_falls_back_to_eager(monkeypatch, caplog, failure):
    import logging
    cleared = []
    monkeypatch.setattr("tmanet.engines.backend._clear_cuda_error", lambda: cleared.append(True))
    cuda = StandInCuda()
    setattr(cuda, failure, True)
    engine = cuda.engine()
    engine.set_batch(1)
    with caplog.at_level(logging.WARNING, logger="tmanet"):
        engine.run(use_graph=True)   # the frame's result came from the eager enqueue; the capture failed quietly
    assert not engine.graphs_ok and len(engine.graphs) == 0 and cleared == [True]
    assert "CUDA graph capture failed" in caplog.text and "running without CUDA graphs" in caplog.text
    engine.run(use_graph=True)
    assert cuda.log == ["enqueue", "capture", "enqueue in capture", "enqueue"]


def test_trt_shape_change_runs_eagerly_before_replaying():
    """Batch 1, then 2, then 1 again: the batch-1 graph exists, but the context's shapes changed under it, so
    the first batch-1 frame runs eagerly (TensorRT's per-shape setup) and only the next one replays."""
    cuda = StandInCuda()
    engine = cuda.engine()
    for b in (1, 2):
        engine.set_batch(b)
        engine.run(use_graph=True)
    del cuda.log[:]
    engine.set_batch(1)
    engine.run(use_graph=True)
    engine.run(use_graph=True)
    assert cuda.log == ["enqueue", "replay"] and len(engine.graphs) == 2


def test_misaligned_head_inputs_are_copied_to_aligned_buffers(caplog):
    import logging

    import torch
    from tmanet.engines.backend import TRT_ALIGNMENT, aligned_for_binding
    base = torch.arange(4096, dtype=torch.float32)
    start = (-base.data_ptr() % TRT_ALIGNMENT) // 4
    aligned, misaligned = base[start:start + 64], base[start + 1:start + 65]   # 4 bytes past an aligned address
    staging, warned = {}, set()
    with caplog.at_level(logging.WARNING, logger="tmanet"):
        for _ in range(2):
            out = aligned_for_binding({"memory_key_0": aligned, "memory_key_1": misaligned}, staging, warned)
            assert out["memory_key_0"] is aligned   # aligned ring views are bound as they are
            assert out["memory_key_1"].data_ptr() % TRT_ALIGNMENT == 0
            assert torch.equal(out["memory_key_1"], misaligned)
    assert staging["memory_key_1"].data_ptr() == out["memory_key_1"].data_ptr()   # allocated once, reused
    warnings = [r for r in caplog.records if "not 256-byte aligned" in r.getMessage()]
    assert len(warnings) == 1 and "memory_key_1" in warnings[0].getMessage()
