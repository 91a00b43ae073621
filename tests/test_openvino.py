"""The openvino backend, run for real: the same two ONNX files as ONNX Runtime, fp32 parity, bf16 agreement on the
trained demo model, the registry's option checks, and bench / eval reporting it beside ort."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tmanet.cli import main
from tmanet.runtime import StreamingSegmenter
from tmanet.test_clips import make_noise_clip

ov = pytest.importorskip("openvino", reason="OpenVINO ships x86/Arm wheels only (pip install 'tmanet-trt[openvino]')")

H, W = 64, 128


def _stream(export_dir, clip, backend, **options):
    seg = StreamingSegmenter.open(export_dir, backend=backend, return_logits=True, **options)
    try:
        results = [seg.push(f) for f in clip]
        return np.stack([r.mask for r in results]), np.stack([r.logits for r in results]), seg.backend.describe()
    finally:
        seg.close()


def test_fp32_equals_onnx_runtime_on_the_same_files(export_b1):
    clip = make_noise_clip(5, H, W, seed=31)   # T=2: every ring phase
    ort_masks, ort_logits, _ = _stream(export_b1, clip, "ort", threads=2)
    ov_masks, ov_logits, described = _stream(export_b1, clip, "openvino", threads=2)
    assert "openvino" in described and "fp32" in described
    assert np.abs(ov_logits - ort_logits).max() < 1e-3 * max(1.0, float(ort_logits.std()))
    assert (ov_masks == ort_masks).mean() > 0.9999


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    from tmanet.checkpoints import load_model
    from tmanet.demo import DEMO_MODEL
    from tmanet.export import export_onnx
    return export_onnx(load_model(DEMO_MODEL), tmp_path_factory.mktemp("demo") / "exp", 128, 256, check=False)


def test_bf16_agrees_with_fp32_on_the_trained_model(demo_export):
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(Exception, match="no bfloat16 support"):
            StreamingSegmenter.open(demo_export, backend="openvino", precision="bf16")
        return
    from tmanet.training.synthetic import ClipSpec, make_street_clip
    clip, _ = make_street_clip(ClipSpec(frames=5, height=128, width=256, degradation=0.5, seed=9102))
    fp32, _, _ = _stream(demo_export, clip, "openvino", precision="fp32")
    bf16, _, described = _stream(demo_export, clip, "openvino", precision="bf16")
    assert "bf16" in described
    assert (bf16 == fp32).mean() >= 0.99


@pytest.mark.parametrize("flags, message", [
    (["--backend", "openvino", "--precision", "fp16"], "--precision fp16: the openvino backend takes fp32, bf16"),
    (["--backend", "torch", "--precision", "bf16"], "--precision bf16: the torch backend takes fp32, fp16"),
    (["--backend", "openvino", "--cuda-graphs"], "--cuda-graphs needs a CUDA backend (torch and trt backends); "
                                                 "got --backend openvino"),
    (["--backend", "openvino", "--channels-last"], "--channels-last applies to the torch backend only"),
])
def test_the_registry_checks_each_backends_options(export_b1, flags, message, capsys):
    assert main(["bench", str(export_b1), "--frames", "1", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bench_and_eval_report_it_beside_ort(export_b1, tmp_path, capsys):
    reports = {}
    for backend in ("ort", "openvino"):
        out = tmp_path / f"{backend}.json"
        assert main(["bench", str(export_b1), "--backend", backend, "--frames", "2", "--warmup", "1", "--threads",
                     "1", "--json", str(out), "--no-progress"]) == 0
        reports[backend] = json.loads(out.read_text())
    assert reports["openvino"]["backend"] == "openvino" and "openvino MatMul" in reports["openvino"]["roofline"]["probe"]
    assert reports["ort"]["roofline"]["probe"].startswith("onnxruntime")
    capsys.readouterr()
    scores = {}
    for backend in ("ort", "openvino"):
        out = tmp_path / f"eval-{backend}.json"
        assert main(["eval", str(export_b1), "--data", "synthetic:1", "--synthetic-frames", "4", "--backend", backend,
                     "--json", str(out), "--no-progress"]) == 0
        scores[backend] = json.loads(out.read_text())
    assert scores["openvino"]["backend"] == "openvino"
    assert abs(scores["openvino"]["miou"] - scores["ort"]["miou"]) < 1e-3
