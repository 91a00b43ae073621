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
    assert main(["bench", str(export_b1), "--frames", "3", "--warmup", "1", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "frame_engine" in out and "frames/s" in out
    r = json.loads((tmp_path / "b.json").read_text())
    for key in ("fps", "latency_ms", "peak_memory_mb", "stages_ms", "backend", "input_size"):
        assert key in r
    assert set(r["latency_ms"]) >= {"p50", "p90", "p99"}
    im = Image.open(tmp_path / "b.png")
    assert im.format == "PNG" and im.size[0] > 100
    assert main(["bench", str(export_b1), "--frames", "0", "--no-progress"]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [[], ["--precision", "fp16", "--cuda-graphs"]])
def test_bench_torch_cuda_compare_official(export_b1, tmp_path, flags):
    out = tmp_path / "cuda.json"
    assert main(["bench", str(export_b1), "--backend", "torch", "--device", "cuda", "--frames", "4",
                 "--warmup", "2", "--compare-official", "--json", str(out), "--no-progress"] + flags) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cuda" and r["speedup_vs_official"] > 0
    assert r["mask_agreement_vs_official"] > (0.99 if flags else 0.999)
    # Device memory: the runtime holds at least its ring (T+1 positions x T slots of key and value features).
    ring_mb = (r["sequence_num"] + 1) * r["sequence_num"] * export_ring_bytes(export_b1) / 2**20
    assert ring_mb <= r["cuda_peak_memory_mb"] < 4096
    assert 0 < r["official_cuda_peak_memory_mb"] < 4096
    if flags:
        assert r["backend_options"] == {"precision": "fp16", "cuda_graphs": True}
        assert "fp16" in r["backend_detail"] and "CUDA graphs on" in r["backend_detail"]
