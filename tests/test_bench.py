"""``tmanet bench``: the report's fields and their internal consistency (not the timings themselves), the
memory probe, and the JSON / plot outputs."""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from PIL import Image

from tmanet.cli import main
from tmanet.runtime.bench import ProfilingTimer, RssProbe, run_bench, summarize
from tmanet.runtime.roofline import count_macs
from tmanet.runtime.segmenter import STAGES

H, W = 64, 128




def export_ring_bytes(export_dir) -> int:
    """Bytes of one ring entry (one frame's memory key + value) of an export, from its manifest."""
    m = json.loads((export_dir / "manifest.json").read_text())
    h, w = m["feature_size"]
    return 4 * h * w * (m["key_channels"] + m["value_channels"])


def check_stats(st):
    assert st["min"] <= st["p50"] <= st["p90"] <= st["p99"] <= st["max"]
    assert st["min"] <= st["mean"] <= st["max"]


def test_summarize_matches_numpy():
    values = np.random.default_rng(0).exponential(10.0, 200)
    st = summarize(values)
    assert st["p50"] == pytest.approx(np.median(values))
    assert st["p99"] == pytest.approx(np.percentile(values, 99))
    assert st["mean"] == pytest.approx(values.mean())
    check_stats(st)


def test_bench_report_is_consistent(export_b1):
    r = run_bench(export_b1, frames=4, warmup=1, compare_official=True, official_frames=4, progress=False)
    assert r["frames"] == 4 and r["warmup"] == 1 and r["input_size"] == [H, W] and r["sequence_num"] == 2
    check_stats(r["latency_ms"])
    assert r["fps"] == pytest.approx(1000.0 / r["latency_ms"]["mean"])
    assert set(r["stages_ms"]) == set(STAGES)
    for st in r["stages_ms"].values():
        check_stats(st)
    # The stages happen inside the push: together they cannot take longer than the whole frame.
    assert sum(st["mean"] for st in r["stages_ms"].values()) <= r["latency_ms"]["mean"] * 1.001
    assert r["stages_ms"]["frame_engine"]["mean"] > 0 and r["stages_ms"]["head"]["mean"] > 0
    assert r["peak_memory_mb"] >= r["loaded_memory_mb"] - 1 and r["peak_rss_mb"] >= r["peak_memory_mb"]
    if r["stage_peak_memory_mb"] is not None:
        assert set(r["stage_peak_memory_mb"]) == set(STAGES)
        assert all(v >= 0 for v in r["stage_peak_memory_mb"].values())
    # The official protocol ran on the same weights and frames: same masks, and the ratio is the ratio.
    assert r["official_frames"] == 4
    check_stats(r["official_latency_ms"])
    assert r["official_fps"] == pytest.approx(1000.0 / r["official_latency_ms"]["mean"])
    assert r["speedup_vs_official"] == pytest.approx(r["fps"] / r["official_fps"])  # the same 4 frames
    assert r["speedup_vs_official_all_frames"] == pytest.approx(r["speedup_vs_official"])
    assert r["mask_agreement_vs_official"] > 0.999
    assert r["cuda_peak_memory_mb"] is None and "official_cuda_peak_memory_mb" not in r  # a CPU run
    # Pipeline efficiency: each engine timed alone as often as the frames, against the frame's median.
    assert set(r["engines_alone_ms"]) == {"frame_engine", "head"}
    for st in r["engines_alone_ms"].values():
        check_stats(st)
        assert st["min"] > 0
    assert r["engines_alone_runs"] == r["frames"]
    assert r["engines_alone_sum_ms"] == pytest.approx(sum(st["p50"] for st in r["engines_alone_ms"].values()))
    assert r["pipeline_efficiency"] == pytest.approx(r["engines_alone_sum_ms"] / r["latency_ms"]["p50"])
    assert "bare_loop_fps" not in r   # only when asked for
    json.dumps(r)  # serialisable as it is


def test_profiling_timer_sees_a_stage_allocation():
    probe = RssProbe()
    if not probe.resettable:
        pytest.skip("this OS cannot reset the peak RSS")
    timer = ProfilingTimer(probe)
    # A garbage collection inside a stage would free earlier tests' memory and lower the RSS under the mark:
    # collect first, and not during the stages.
    gc.collect()
    gc.disable()
    try:
        with timer("head"):
            block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, touched
            del block
        with timer("post"):
            pass
    finally:
        gc.enable()
    assert timer.stage_peak["head"] >= 60 * 1024 * 1024
    assert timer.stage_peak["post"] < 16 * 1024 * 1024
    assert timer.last["head"] > 0


def test_bench_command_writes_json_and_plot(export_b1, tmp_path, capsys):
    (tmp_path / "b.png").write_bytes(b"an older plot")
    assert main(["bench", str(export_b1), "--frames", "3", "--warmup", "1", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "frame_engine" in out and "frames/s" in out and "GFLOP/frame" in out
    r = json.loads((tmp_path / "b.json").read_text())
    for key in ("fps", "latency_ms", "peak_memory_mb", "stages_ms", "backend", "input_size", "roofline"):
        assert key in r
    assert set(r["latency_ms"]) >= {"p50", "p90", "p99"}
    # Every frame's latency in order, the warm-up frame first: the timed ones are what the summary is of.
    assert len(r["frame_latency_ms"]) == 4
    assert np.median(r["frame_latency_ms"][1:]) == pytest.approx(r["latency_ms"]["p50"])
    im = Image.open(tmp_path / "b.png")
    assert im.format == "PNG" and im.size[0] > 1000   # three panels: stages, frames over time, roofline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.png"]   # no temporary left behind
    assert main(["bench", str(export_b1), "--frames", "0", "--no-progress"]) == 2


def conv_macs(cin, cout, k, h, w, groups=1):
    return h * w * cout * (cin // groups) * k * k


def tiny_frame_encoder_macs(H, W, c=16, T=2, ck=16, cv=32):
    """Multiply-adds of the tiny model's frame encoder, from the architecture: ResNet-18 V1c (deep stem of
    three 3x3 convs, the first at stride 2; max-pool; BasicBlocks of two 3x3 convs; output stride 8 = strides
    1, 2, 1, 1 with dilated layers 3-4, a 1x1 downsample where the stride or width changes), then the key/value
    encoders of the query and the T slots as one 1x1 conv and two grouped 3x3 convs."""
    h2, w2, h4, w4, h8, w8 = H // 2, W // 2, H // 4, W // 4, H // 8, W // 8
    stem = conv_macs(3, c // 2, 3, h2, w2) + conv_macs(c // 2, c // 2, 3, h2, w2) + conv_macs(c // 2, c, 3, h2, w2)
    layer1 = 4 * conv_macs(c, c, 3, h4, w4)
    deeper = 0
    for cin, cout in ((c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c)):   # layers 2-4, all at 1/8
        deeper += (conv_macs(cin, cout, 3, h8, w8) + conv_macs(cout, cout, 3, h8, w8)   # block 1
                   + conv_macs(cin, cout, 1, h8, w8)                                       # its downsample
                   + 2 * conv_macs(cout, cout, 3, h8, w8))                                 # block 2
    encoders = (conv_macs(8 * c, (T + 1) * (ck + cv), 1, h8, w8)
                + conv_macs((T + 1) * ck, (T + 1) * ck, 3, h8, w8, groups=T + 1)
                + conv_macs((T + 1) * cv, (T + 1) * cv, 3, h8, w8, groups=T + 1))
    return stem + layer1 + deeper + encoders


def tiny_head_macs(H, W, T=2, ck=16, cv=32, channels=32, classes=19):
    """The memory read (q.k over T*h*w positions, then the weighted sum of the values), the 3x3 bottleneck
    over cat([query value, read]) and the 1x1 classifier."""
    n = (H // 8) * (W // 8)
    read = n * ck * (T * n) + n * (T * n) * cv
    return read, conv_macs(2 * cv, channels, 3, H // 8, W // 8) + conv_macs(channels, classes, 1, H // 8, W // 8)


def test_counted_work_of_a_small_export_matches_the_architecture(export_b1, tiny_export_dir):
    assert count_macs(export_b1 / "frame_encoder.onnx")["total"] == tiny_frame_encoder_macs(H, W)
    head = count_macs(export_b1 / "memory_head.onnx")
    read, convs = tiny_head_macs(H, W)
    assert head["per_op"]["MatMul"] == read and head["per_op"]["Conv"] == convs
    # A batch of 2 is twice the work; a dynamic batch is counted at the batch asked for.
    assert count_macs(tiny_export_dir(batch=2) / "memory_head.onnx")["total"] == 2 * (read + convs)
    dynamic = count_macs(tiny_export_dir(dynamic=True) / "frame_encoder.onnx", batch=3)
    assert dynamic["batch"] == 3 and dynamic["total"] == 3 * tiny_frame_encoder_macs(H, W)


def test_chunked_read_is_counted_once_in_full(make_tiny_model, tmp_path):
    """With 32-query chunks the exporter writes one MatMul pair per chunk: their work adds up to the read."""
    from tmanet.export import export_onnx
    export = export_onnx(make_tiny_model(seed=1), tmp_path, H, W, query_chunk=32, check=False)
    import onnx
    matmuls = [n for n in onnx.load(str(export / "memory_head.onnx")).graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 * (H // 8) * (W // 8) // 32
    assert count_macs(export / "memory_head.onnx")["per_op"]["MatMul"] == tiny_head_macs(H, W)[0]


def test_roofline_report(export_b1):
    r = run_bench(export_b1, frames=3, warmup=1, progress=False)
    roof = r["roofline"]
    assert roof["peak_tflops"] > 0 and "onnxruntime MatMul" in roof["probe"]
    read, convs = tiny_head_macs(H, W)
    assert roof["head"]["gflop"] == pytest.approx(2 * (read + convs) / 1e9)
    assert roof["frame_engine"]["gflop"] == pytest.approx(2 * tiny_frame_encoder_macs(H, W) / 1e9)
    for stage in ("frame_engine", "head"):
        e = roof[stage]
        assert e["tflops"] == pytest.approx(e["gflop"] / r["stages_ms"][stage]["p50"])
        assert e["fraction_of_peak"] == pytest.approx(e["tflops"] / roof["peak_tflops"])
    assert "roofline" not in run_bench(export_b1, frames=1, warmup=0, progress=False, roofline=False)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [[], ["--precision", "fp16", "--cuda-graphs"]])
def test_bench_torch_cuda_compare_official(export_b1, tmp_path, flags):
    out = tmp_path / "cuda.json"
    assert main(["bench", str(export_b1), "--backend", "torch", "--device", "cuda", "--frames", "4",
                 "--warmup", "2", "--compare-official", "--json", str(out), "--no-progress"] + flags) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cuda" and r["speedup_vs_official"] > 0
    assert r["mask_agreement_vs_official"] > (0.99 if flags else 0.999)
    # Device memory: the runtime holds at least its ring (T+1 positions x T slots of key and value features),
    # in half precision with fp16.
    ring_mb = (r["sequence_num"] + 1) * r["sequence_num"] * export_ring_bytes(export_b1) / 2**20 / (2 if flags else 1)
    assert ring_mb <= r["cuda_peak_memory_mb"] < 4096
    assert 0 < r["official_cuda_peak_memory_mb"] < 4096
    roof = r["roofline"]   # the peak probed by torch matmul in the backend's precision, on the device
    assert f"torch matmul {'fp16' if flags else 'fp32'}" in roof["probe"] and "cuda" in roof["probe"]
    assert 0 < roof["frame_engine"]["fraction_of_peak"] and 0 < roof["head"]["fraction_of_peak"]
    if flags:
        assert r["backend_options"] == {"precision": "fp16", "cuda_graphs": True}
        assert "fp16" in r["backend_detail"] and "CUDA graphs on" in r["backend_detail"]


def test_stages_end_with_the_backends_device_synchronisation(export_b1):
    """A backend on a CUDA device enqueues asynchronously (TensorRT on its own stream): each stage must wait
    for it, or the frame engine's device time lands in the head stage. A stand-in that logs its calls."""
    from tmanet.runtime.backends import BACKENDS, register_backend
    from tmanet.runtime.backends.ort import OrtBackend
    calls = []

    class AsyncStandIn(OrtBackend):
        name = "async-stand-in"

        def __init__(self, export_dir, manifest, device="cuda:0", **options):
            super().__init__(export_dir, manifest, "cpu", **options)
            self.device = device   # what the bench sees: a device whose work is asynchronous

        def encode(self, frames):
            calls.append("encode")
            return super().encode(frames)

        def head(self, *args, **kwargs):
            calls.append("head")
            return super().head(*args, **kwargs)

        def synchronize(self):
            calls.append("sync")

    register_backend("async-stand-in", AsyncStandIn)
    try:
        run_bench(export_b1, backend="async-stand-in", device="cuda:0", frames=2, warmup=0, progress=False,
                  roofline=False)
    finally:
        BACKENDS.pop("async-stand-in")
    # 2 timed frames, then each engine alone 2 times (the pipeline efficiency): every call synchronised.
    assert calls.count("encode") == calls.count("head") == 4
    for i, call in enumerate(calls):
        if call in ("encode", "head"):
            assert calls[i + 1] == "sync", calls


def test_bare_loop_report(export_b1, capsys):
    """The bare loop (plain session.run of the same two sessions) runs once after every timed frame; its
    frames/s and the runtime's share of it come from the same report."""
    r = run_bench(export_b1, frames=3, warmup=1, progress=False, roofline=False, bare_loop=True)
    check_stats(r["bare_loop_latency_ms"])
    assert r["bare_loop_latency_ms"]["min"] > 0
    assert r["bare_loop_fps"] == pytest.approx(1000.0 / r["bare_loop_latency_ms"]["mean"])
    assert r["runtime_vs_bare_loop"] == pytest.approx(r["fps"] / r["bare_loop_fps"])
    with pytest.raises(ValueError, match="backend 'ort' only"):
        run_bench(export_b1, backend="torch", frames=1, warmup=0, progress=False, roofline=False, bare_loop=True)
    from tmanet.runtime.bench import format_report
    text = format_report(r)
    assert "bare loop" in text and "efficiency" in text


def test_kernel_table_sums_the_timed_runs():
    """ORT's trace: runs after the skipped first, kernels summed per node and per op type, per run."""
    from tmanet.runtime.op_profile import kernel_table

    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}
    events = [run(0, 100), kernel("mm", "MatMul", 1, 50), kernel("sm", "Softmax", 60, 30),
              run(200, 60), kernel("mm", "MatMul", 201, 40), kernel("sm", "Softmax", 241, 10),
              {"cat": "Node", "name": "mm_fence_before", "ts": 201, "dur": 1, "args": {"op_name": "MatMul"}},
              run(300, 40), kernel("mm", "MatMul", 301, 20), kernel("sm", "Softmax", 321, 10),
              kernel("sm2", "Softmax", 331, 4)]
    t = kernel_table(events)
    assert t["runs"] == 2 and t["run_ms"] == [0.06, 0.04]
    assert t["per_node"]["mm"] == {"op": "MatMul", "ms": pytest.approx(0.030)}
    assert t["per_op"] == {"MatMul": pytest.approx(0.030), "Softmax": pytest.approx(0.012)}
    assert list(t["per_op"]) == ["MatMul", "Softmax"]   # costliest first
    with pytest.raises(ValueError, match="need more than"):
        kernel_table(events[:3])


def test_bench_profile_writes_traces_and_tables(export_b1, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["bench", str(export_b1), "--frames", "2", "--warmup", "0", "--no-roofline", "--no-progress",
                 "--profile", str(out)]) == 0
    assert "profile head" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["frame_engine_trace.json", "head_trace.json", "ops.json"]
    tables = json.loads((out / "ops.json").read_text())
    for engine, t in tables.items():
        assert t["runs"] == 2
        by_op = {}
        for node in t["per_node"].values():
            by_op[node["op"]] = by_op.get(node["op"], 0) + node["ms"]
        assert by_op == pytest.approx(t["per_op"])
    assert "MatMul" in tables["head"]["per_op"] or "FusedMatMul" in tables["head"]["per_op"]
    assert "Conv" in tables["frame_engine"]["per_op"]
    # A folder holding anything else is not replaced; a second profile replaces the first.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["bench", str(export_b1), "--frames", "1", "--no-roofline", "--no-progress",
                 "--profile", str(tmp_path / "mine")]) == 2
    assert "not a profile" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()
    assert main(["bench", str(export_b1), "--frames", "1", "--warmup", "0", "--no-roofline", "--no-progress",
                 "--profile", str(out)]) == 0
    assert json.loads((out / "ops.json").read_text())["head"]["runs"] == 1


def test_cpu_hints_follow_the_cpu_and_the_export():
    """What bench says about the CPU path: a TensorRT-placed INT8 export on ONNX Runtime, INT8 on a CPU without
    integer dot products, and OpenVINO's bf16 where the CPU has it; nothing when nothing is known."""
    from tmanet.cpu_features import cpu_hints, parse_flags
    spr = parse_flags("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_int8\n")
    avx2 = parse_flags("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    arm = parse_flags("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert "avx512_vnni" in spr and "asimddp" in arm and parse_flags("no flags here") == frozenset()
    fp32, int8 = {"frame_encoder": "fp32", "memory_head": "fp32"}, {"frame_encoder": "int8", "memory_head": "int8"}
    assert cpu_hints("ort", fp32, "trt", avx2, openvino=True) == []
    trt = cpu_hints("ort", int8, "trt", spr, openvino=False)
    assert len(trt) == 1 and "placed for TensorRT" in trt[0] and "--target cpu" in trt[0]
    assert cpu_hints("ort", int8, "cpu", spr, openvino=False) == []     # VNNI: INT8 pays
    assert cpu_hints("ort", int8, "cpu", arm, openvino=False) == []     # Arm dot-product too
    no_dot = cpu_hints("ort", int8, "cpu", avx2, openvino=False)
    assert len(no_dot) == 1 and "no VNNI" in no_dot[0]
    bf16 = cpu_hints("ort", fp32, "trt", spr, openvino=True)
    assert len(bf16) == 1 and "--backend openvino --precision bf16" in bf16[0]
    assert cpu_hints("ort", fp32, "trt", spr, openvino=False) == []     # not installed: not offered
    assert cpu_hints("openvino", int8, "trt", spr, openvino=True) == []  # other backends: their own business
    assert cpu_hints("ort", int8, "trt", frozenset(), openvino=True) == []  # flags unknown: say nothing


def test_bench_report_carries_the_cpu_hints(export_b1, monkeypatch):
    import importlib.util

    from tmanet import cpu_features
    from tmanet.runtime.bench import format_report
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2"}))
    report = run_bench(export_b1, frames=2, warmup=1, progress=False, roofline=False)
    assert report["hints"] == [] and "hint" not in format_report(report)  # fp32, no BF16: nothing to say
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    report = run_bench(export_b1, frames=2, warmup=1, progress=False, roofline=False)
    with_openvino = importlib.util.find_spec("openvino") is not None
    assert len(report["hints"]) == int(with_openvino)
    assert ("hint          this CPU has AVX-512 BF16 / AMX" in format_report(report)) == with_openvino
