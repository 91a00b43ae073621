"""``tmanet bench``: latency per stage, throughput and peak memory of the streaming runtime, and optionally
the official protocol (the backbone on 1+T frames for every output frame, torch eager) on the same weights
and frames, timed in the same process so the speedup is a ratio of two measurements taken side by side.

Memory: the process's peak resident set size (RSS), which is what counts for ONNX Runtime's arenas and
torch's allocator alike (tracemalloc sees neither). On Linux the high-water mark is reset before each stage
(``/proc/self/clear_refs``), so each stage's peak above the RSS at its start is measured on its own;
elsewhere only the whole run's peak is reported (``ru_maxrss``, which cannot be reset). On a CUDA device the
torch allocator's peak is reported too: the runtime's device memory (weights, ring, activations, graph pools)
above what was allocated before it was opened, and an official frame's transient peak on its own.
"""
from __future__ import annotations

import platform
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tmanet import safe_files
from tmanet.safe_files import atomic_file
from tmanet.manifest import head_input_names, load_manifest

from .segmenter import STAGES, StageTimer

MB = 1024 * 1024


# -- memory -----------------------------------------------------------------------------------------------
class RssProbe:
    """Current and peak RSS in bytes, with a resettable peak where the OS allows it."""

    def __init__(self):
        self.resettable = self._try_reset()
        self.method = "VmHWM (reset per stage)" if self.resettable else "ru_maxrss (whole process)"

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return RssProbe._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(field):
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    def reset_peak(self):
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def current(self) -> int:
        rss = self._status("VmRSS")
        return rss if rss is not None else self.peak()

    def peak(self) -> int:
        if self.resettable:
            return self._status("VmHWM")
        import resource  # POSIX only; Linux takes the resettable path above
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class ProfilingTimer(StageTimer):
    """StageTimer that also records each stage's peak RSS above the RSS at the stage's start, and the
    run's overall peak (kept across the per-stage resets)."""

    def __init__(self, probe: RssProbe, sync=None):
        super().__init__(sync)
        self.probe = probe
        self.stage_peak = dict.fromkeys(STAGES, 0)
        self.overall_peak = 0

    @contextmanager
    def __call__(self, stage):
        if not self.probe.resettable:
            with super().__call__(stage):
                yield
            return
        self.overall_peak = max(self.overall_peak, self.probe.peak())
        self.probe.reset_peak()
        before = self.probe.current()
        with super().__call__(stage):  # the probe's reads stay outside the timed interval
            yield
        peak = self.probe.peak()
        self.overall_peak = max(self.overall_peak, peak)
        self.stage_peak[stage] = max(self.stage_peak[stage], peak - before)


class CudaMemoryProbe:
    """Peak bytes held by torch's CUDA allocator, resettable between the runtime's and the official's work."""

    def __init__(self, device: str):
        import torch
        self.cuda, self.device = torch.cuda, torch.device(device)

    def reset(self) -> int:
        """Synchronize, restart the peak at the current allocation and return that allocation."""
        self.cuda.synchronize(self.device)
        self.cuda.reset_peak_memory_stats(self.device)
        return self.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        self.cuda.synchronize(self.device)
        return self.cuda.max_memory_allocated(self.device)


# -- statistics -------------------------------------------------------------------------------------------
def summarize(ms) -> dict:
    a = np.asarray(ms, np.float64)
    if a.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(a.min()), "max": float(a.max())}


def bench_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic clip at the export size: the documented smooth moving texture."""
    from tmanet.test_clips import make_noise_clip
    return make_noise_clip(count, height, width, seed)


# -- the official protocol --------------------------------------------------------------------------------
class OfficialProtocol:
    """The official test protocol on the manifest's checkpoint: ``TMANet.forward`` in torch eager (BatchNorm
    unfolded), the backbone on the frame and on each of its T memory frames ``t-T..t-1`` (clamped to frame 0),
    plus normalisation and argmax. ``frame(t)`` returns stream 0's mask and the latency in ms."""

    def __init__(self, spec, clip: np.ndarray, streams: int, device: str = "cpu",
                 threads: int | None = None):
        import torch

        from tmanet.checkpoints import load_model
        from tmanet.presets import ModelConfig
        from .backends.torch import resolve_checkpoint
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        path = resolve_checkpoint(spec.directory, spec)
        self.model = load_model(path, ModelConfig.from_dict(spec.config)).to(device).eval()
        self.clip, self.streams, self.device = clip, streams, device
        self.T = self.model.config.memory_frames
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def frame(self, t: int):
        torch, model = self.torch, self.model
        start = time.perf_counter()
        with torch.inference_mode():
            idx = [max(t - self.T + i, 0) for i in range(self.T)]
            batch = torch.from_numpy(np.repeat(self.clip[t][None], self.streams, 0)).to(self.device)
            memory = torch.from_numpy(np.repeat(self.clip[idx][None], self.streams, 0)).to(self.device)
            logits = model(model.normalize(batch), model.normalize(memory))
            mask = logits.argmax(1).to(torch.uint8).cpu().numpy()
        self.sync()
        return mask[0], (time.perf_counter() - start) * 1e3


# -- the benchmark ----------------------------------------------------------------------------------------
ENGINE_GRAPHS = {"frame_engine": "frame_encoder.onnx", "head": "memory_head.onnx"}  # roofline rows
ALONE_BLOCK = 5  # timed frames between two rounds of the engines alone (pipeline efficiency)


@dataclass
class Measured:
    """What the timing loop recorded: milliseconds per timed frame (``frames_ms`` has the warm-up too),
    the backend's own device timings where it reports them (TensorRT's CUDA events), and memory peaks."""
    totals: list = field(default_factory=list)
    frames_ms: list = field(default_factory=list)
    stages: dict = field(default_factory=lambda: {s: [] for s in STAGES})
    device: dict = field(default_factory=dict)
    official_ms: list = field(default_factory=list)
    bare_ms: list = field(default_factory=list)
    alone: dict = field(default_factory=lambda: {"frame_engine": [], "head": []})
    agreement: list = field(default_factory=list)
    peak_rss: int = 0
    gpu_peak: int = 0
    gpu_official_peak: int = 0


def run_bench(export_dir, backend: str = "ort", device: str = "cpu", frames: int = 50, warmup: int = 5,
              compare_official: bool = False, official_frames: int | None = None, threads: int | None = None,
              seed: int = 0, progress: bool = True, backend_options: dict | None = None,
              roofline: bool = True, bare_loop: bool = False) -> dict:
    """Stream ``warmup + frames`` synthetic frames at the export size and time the last ``frames``.

    With ``compare_official`` the official protocol runs on the first ``official_frames`` timed frames,
    interleaved frame by frame with the streaming runtime, so both see the same machine load (timings on a
    shared machine drift over minutes). Its model is loaded before the runtime and the peak-RSS mark is reset
    after each official frame, so the memory figures are the runtime's alone. ``backend_options`` go to the
    backend (e.g. ``precision="fp16"``, ``cuda_graphs=True`` for torch on CUDA; the TensorRT backend is
    opened with ``profile=True`` unless told otherwise, for its CUDA-event timings); the official protocol
    always runs in float32 eager. With ``roofline`` each engine's work (counted from its ONNX graph) is
    set against a GEMM peak probed on the same backend after the timing loop (:mod:`.roofline`).

    Pipeline efficiency: after every :data:`ALONE_BLOCK` timed frames each engine runs that many times in a loop
    by itself (same backend, same sessions, the last frame's inputs), so over the run each engine is timed alone
    ``frames`` times, under the same drifting machine load as the frames; the sum of their medians over the
    runtime's median frame is the share of a frame that is engine work (the rest: pre/post, the ring, and
    whatever the engines lose to each other when they alternate). With ``bare_loop`` (``ort`` only) each timed frame is followed by one frame
    of a bare loop of the same two sessions (plain ``session.run`` on numpy inputs, the frame's own memory
    encodings as the slots, no runtime), timed on its own: the runtime's frames/s over the bare loop's, in one
    run and on the same machine load."""

    from .backends import get_backend
    from .segmenter import StreamingSegmenter
    if frames < 1 or warmup < 0:
        raise ValueError(f"frames must be >= 1 and warmup >= 0, got {frames} and {warmup}")
    spec = load_manifest(export_dir)
    H, W = spec.input_size
    streams = spec.batch or 1  # a dynamic-batch export: one stream
    clip = bench_frames(warmup + frames, H, W, seed)
    options = dict(backend_options or {})
    if threads:
        options["threads"] = threads
    backend_class = get_backend(backend)
    for key, value in getattr(backend_class, "bench_options", {}).items():
        options.setdefault(key, value)
    if bare_loop and backend != "ort":
        raise ValueError(f"the bare loop runs ONNX Runtime sessions: backend 'ort' only (got {backend!r})")
    n_official = min(official_frames or frames, frames) if compare_official else 0
    official = OfficialProtocol(spec, clip, streams, device, threads) if n_official else None

    gpu = (CudaMemoryProbe(device) if getattr(backend_class, "measures_torch_cuda_memory", False)
           and device.startswith("cuda") else None)
    gpu_before = gpu.reset() if gpu else 0
    probe = RssProbe()
    probe.reset_peak()
    rss_before = probe.current()
    seg = StreamingSegmenter.open(export_dir, backend=backend, device=device, **options)
    try:
        timer = ProfilingTimer(probe, sync=_sync_for(seg.backend))
        timer.overall_peak = probe.peak()   # loading the engines counts too
        rss_loaded = probe.current()
        seg.timer = timer
        bare = BareLoop(seg.backend, streams) if bare_loop else None
        measured = _time_frames(seg, clip, warmup, streams, official, n_official, probe, gpu, progress, bare)
        # The GEMM probe runs after the timing loop, never between timed frames: its large matrices would
        # evict the engines' weights from the caches and its thread pool would compete with the next frame.
        gemm = _gemm_probe(seg.backend, frames) if roofline else None
        roof = _roofline(export_dir, gemm, streams, measured) if gemm else None
        described = seg.backend.describe()
    finally:
        seg.close()
    report = {
        "export": str(Path(export_dir).resolve()), "backend": backend, "backend_detail": described,
        "device": device, "preset": spec.preset, "input_size": [H, W],
        "sequence_num": spec.memory_frames, "batch": spec.batch_setting, "streams": streams,
        "precision": spec.precision, "backend_options": dict(backend_options or {}),
        "frames": frames, "warmup": warmup,
        **_memory_report(measured, timer, probe, rss_before, rss_loaded, gpu_before if gpu else None),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
    }
    if device == "cpu":
        import importlib.util

        from tmanet.cpu_features import cpu_flags, cpu_hints
        report["hints"] = cpu_hints(backend, spec.precision, spec.target, cpu_flags(),
                                    openvino=importlib.util.find_spec("openvino") is not None)
    report.update(_latency_report(measured, streams))
    report.update(_pipeline_report(measured.alone, report["latency_ms"]))
    if bare is not None:
        report.update(_bare_loop_report(measured, streams))
    if official is not None:
        report.update(_official_report(measured, streams, n_official, official, gpu))
    if roof is not None:
        report["roofline"] = roof
    return report


def _time_frames(seg, clip, warmup, streams, official, n_official, probe, gpu, progress, bare=None) -> Measured:
    """The timing loop: push every frame of ``clip``, time the frames after ``warmup``, interleave the
    official protocol's frames and the bare loop's (each untimed by the runtime's clock), follow the memory
    peaks."""
    from tqdm import tqdm
    m, timer = Measured(), seg.timer
    bar = tqdm(range(len(clip)), desc=f"bench {seg.backend.name}" + (" + official" if official else ""),
               unit="frame", disable=not progress)
    for i in bar:
        frame = clip[i]
        start = time.perf_counter()
        if streams == 1:
            res = [seg.push(frame)]
        else:
            res = seg.push_batch(np.repeat(frame[None], streams, 0))
        elapsed = (time.perf_counter() - start) * 1e3
        m.frames_ms.append(elapsed)
        if i >= warmup:
            m.totals.append(elapsed)
            for s in STAGES:
                m.stages[s].append(timer.last[s] * 1e3)
            for key, value in (getattr(seg.backend, "last_timing", None) or {}).items():
                if value is not None:
                    m.device.setdefault(key, []).append(value)
        if gpu:
            m.gpu_peak = max(m.gpu_peak, gpu.peak())
        if bare is not None:
            ms = bare.frame(np.repeat(frame[None], streams, 0))
            if i >= warmup:
                m.bare_ms.append(ms)
        timed = i - warmup + 1
        if timed > 0 and (timed % ALONE_BLOCK == 0 or i == len(clip) - 1):
            _engines_alone(seg, np.repeat(frame[None], streams, 0), timed - len(m.alone["head"]), m.alone)
        if official is not None and (i == warmup - 1 or warmup <= i < warmup + n_official):
            timer.overall_peak = max(timer.overall_peak, probe.peak())
            start_bytes = gpu.reset() if gpu else 0
            mask, ms = official.frame(i)
            probe.reset_peak()  # the official model's transient memory is not the runtime's
            if gpu:
                m.gpu_official_peak = max(m.gpu_official_peak, gpu.peak() - start_bytes)
                gpu.reset()
            if i >= warmup:     # the frame before the timed ones warms the official model up
                m.official_ms.append(ms)
                m.agreement.append(float(np.mean(mask == res[0].mask)))
    m.peak_rss = max(timer.overall_peak, probe.peak())
    return m


def _memory_report(m: Measured, timer, probe, rss_before, rss_loaded, gpu_before) -> dict:
    return {"peak_memory_mb": (m.peak_rss - rss_before) / MB, "peak_rss_mb": m.peak_rss / MB,
            "loaded_memory_mb": (rss_loaded - rss_before) / MB,
            "stage_peak_memory_mb": ({s: v / MB for s, v in timer.stage_peak.items()} if probe.resettable
                                     else None),
            "memory_method": probe.method,
            "cuda_peak_memory_mb": (m.gpu_peak - gpu_before) / MB if gpu_before is not None else None}


def _latency_report(m: Measured, streams: int) -> dict:
    total = summarize(m.totals)
    out = {"fps": streams * 1e3 / total["mean"], "latency_ms": total,
           "stages_ms": {s: summarize(v) for s, v in m.stages.items()}, "frame_latency_ms": m.frames_ms}
    if m.device:
        out["device_timing_ms"] = {k: summarize(v) for k, v in m.device.items()}
    return out


class BareLoop:
    """The same two ONNX Runtime sessions as the runtime's ``ort`` backend, back to back with plain
    ``session.run`` on numpy inputs: each frame's own memory encodings are its slots (the work of a frame
    without the ring, IOBinding, pre/post). ``frame(frames)`` returns the milliseconds of one frame."""

    def __init__(self, backend, streams: int):
        self.encoder, self.head = backend.encoder, backend.memory_head
        self.T = backend.memory_frames
        self.names = head_input_names(self.T)

    def frame(self, frames: np.ndarray) -> float:
        start = time.perf_counter()
        qk, qv, mk, mv = self.encoder.run(None, {"frames": frames})
        slots = [np.ascontiguousarray(mk[:, i]) for i in range(self.T)] + \
                [np.ascontiguousarray(mv[:, i]) for i in range(self.T)]
        self.head.run(None, dict(zip(self.names, [qk, qv, *slots])))
        return (time.perf_counter() - start) * 1e3


def _engines_alone(seg, frames: np.ndarray, n: int, times: dict):
    """Each engine of the open segmenter run ``n`` times in a loop by itself, on the last pushed frame's
    inputs (the head reads the ring's slots of the last call's rows), appended to ``times[engine]`` (ms).
    The stream's state is untouched: the ring is only read, and the outputs are the backend's scratch
    buffers, which the next push overwrites anyway."""
    backend, sync = seg.backend, _sync_for(seg.backend) or (lambda: None)
    rows = seg.last_calls[-1]
    ring = seg.stepper.ring
    for _ in range(n):
        start = time.perf_counter()
        qk, qv, _, _ = backend.encode(frames)
        sync()
        times["frame_engine"].append((time.perf_counter() - start) * 1e3)
    slot_keys, slot_values = ring.slot_keys(rows), ring.slot_values(rows)
    for _ in range(n):
        start = time.perf_counter()
        seg._head(qk, qv, slot_keys, slot_values)
        sync()
        times["head"].append((time.perf_counter() - start) * 1e3)


def _pipeline_report(alone: dict, frame_ms: dict) -> dict:
    """Each engine's time alone and the pipeline efficiency: the sum of their p50s over the frame's p50."""
    stats = {name: summarize(ms) for name, ms in alone.items()}
    engines = sum(st["p50"] for st in stats.values())
    return {"engines_alone_ms": stats, "engines_alone_runs": len(alone["head"]), "engines_alone_sum_ms": engines,
            "pipeline_efficiency": engines / frame_ms["p50"]}


def _bare_loop_report(m: Measured, streams: int) -> dict:
    st = summarize(m.bare_ms)
    fps = streams * 1e3 / st["mean"]
    runtime_fps = streams * 1e3 / summarize(m.totals)["mean"]
    return {"bare_loop_latency_ms": st, "bare_loop_fps": fps, "runtime_vs_bare_loop": runtime_fps / fps}


def _official_report(m: Measured, streams, n_official, official, gpu) -> dict:
    st = summarize(m.official_ms)
    out = {"official_frames": n_official, "official_latency_ms": st, "official_fps": streams * 1e3 / st["mean"],
           # Same frames: compare with the runtime's latency on exactly those frames.
           "speedup_vs_official": st["mean"] / float(np.mean(m.totals[:n_official])),
           "mask_agreement_vs_official": float(np.mean(m.agreement)),
           "official_threads": official.torch.get_num_threads()}
    out["speedup_vs_official_all_frames"] = streams * 1e3 / summarize(m.totals)["mean"] / out["official_fps"]
    if gpu:
        out["official_cuda_peak_memory_mb"] = m.gpu_official_peak / MB
    return out


def _gemm_probe(backend, samples: int):
    from .roofline import GemmProbe
    return GemmProbe(backend.gemm_kernel(), min_samples=max(5, min(samples, 20)))


def _roofline(export_dir, gemm, streams, m: Measured) -> dict:
    from .roofline import export_work_gflop, roofline
    work = export_work_gflop(export_dir, ENGINE_GRAPHS)
    return roofline(work, {s: summarize(m.stages[s])["p50"] for s in ENGINE_GRAPHS}, streams, gemm.peak())


def _sync_for(backend_obj):
    """What ends a stage: the backend's device synchronisation when it runs on a CUDA device, so work it
    enqueued asynchronously is charged to the stage that enqueued it (None on the CPU)."""
    return backend_obj.synchronize if str(backend_obj.device).startswith("cuda") else None


def format_report(r: dict) -> str:
    lines = [f"{r['backend_detail']}  {r['input_size'][0]}x{r['input_size'][1]}  T={r['sequence_num']}  "
             f"streams={r['streams']}  {r['frames']} frames (+{r['warmup']} warm-up)",
             f"{'stage':<14}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}  ms" +
             ("   peak MB" if r.get("stage_peak_memory_mb") else "")]
    rows = [(s, r["stages_ms"][s]) for s in STAGES] + [("total", r["latency_ms"])]
    for name, st in rows:
        mem = r.get("stage_peak_memory_mb") or {}
        extra = f"{mem[name]:>10.1f}" if name in mem else ""
        lines.append(f"{name:<14}{st['mean']:>9.2f}{st['p50']:>9.2f}{st['p90']:>9.2f}{st['p99']:>9.2f}    {extra}")
    lines.append(f"throughput    {r['fps']:.2f} frames/s")
    alone = r["engines_alone_ms"]
    lines.append(f"pipeline      {100 * r['pipeline_efficiency']:.1f}% efficiency: engines alone "
                 f"{alone['frame_engine']['p50']:.2f} + {alone['head']['p50']:.2f} = {r['engines_alone_sum_ms']:.2f} ms "
                 f"p50 vs {r['latency_ms']['p50']:.2f} ms per frame")
    if "bare_loop_fps" in r:
        lines.append(f"bare loop     {r['bare_loop_fps']:.2f} frames/s (plain session.run, interleaved), runtime "
                     f"{r['fps']:.2f} frames/s: {100 * r['runtime_vs_bare_loop']:.1f}% of the bare loop")
    lines.append(f"peak memory   {r['peak_memory_mb']:.0f} MB above the start ({r['peak_rss_mb']:.0f} MB RSS; "
                 f"{r['loaded_memory_mb']:.0f} MB after loading)")
    if r.get("cuda_peak_memory_mb") is not None:
        lines.append(f"CUDA memory   {r['cuda_peak_memory_mb']:.0f} MB peak allocated by the runtime (weights, ring, "
                     f"activations)")
    if "official_fps" in r:
        lines.append(f"official      {r['official_fps']:.2f} frames/s (torch eager, backbone on 1+T frames, "
                     f"{r['official_frames']} frames, p50 {r['official_latency_ms']['p50']:.1f} ms)")
        if r.get("official_cuda_peak_memory_mb") is not None:
            lines.append(f"official CUDA {r['official_cuda_peak_memory_mb']:.0f} MB transient peak per frame")
        lines.append(f"speedup       {r['speedup_vs_official']:.2f}x vs official (same frames, interleaved); "
                     f"masks agree on {100 * r['mask_agreement_vs_official']:.3f}% of pixels")
    if r.get("device_timing_ms"):
        lines.append("device        " + ", ".join(f"{k} p50 {v['p50']:.3f}" for k, v in r["device_timing_ms"].items()))
    if r.get("roofline"):
        lines += format_roofline(r["roofline"])
    lines += [f"hint          {h}" for h in r.get("hints") or ()]
    return "\n".join(lines)


def format_roofline(roof: dict) -> list[str]:
    lines = [f"roofline      peak {roof['peak_tflops'] * 1e3:.1f} GFLOP/s ({roof['probe']}, median of "
             f"{roof['probe_samples']}, after the timed frames; best {roof['probe_best_tflops'] * 1e3:.1f})",
             f"{'engine':<14}{'GFLOP/frame':>12}{'GFLOP/s':>10}{'of peak':>9}"]
    for name in ENGINE_GRAPHS:
        e = roof[name]
        lines.append(f"{name:<14}{e['gflop']:>12.2f}{e['tflops'] * 1e3:>10.1f}{100 * e['fraction_of_peak']:>8.1f}%")
    if any(roof[name]["fraction_of_peak"] > 1 for name in ENGINE_GRAPHS):
        lines.append("  (above 100 %: the peak is one square fp32 GEMM; an engine's convolutions can run faster kernels "
                     "(Winograd, fused, lower precision) or be counted on a busier moment of the machine)")
    return lines


def plot_report(r: dict, path):
    """A PNG (matplotlib, Agg): per-stage p50 bars with p90/p99 whiskers, the latency of every frame in
    order (warm-up shaded), and the roofline (each engine's achieved GFLOP/s against the probed peak)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    panels = 3 if r.get("roofline") else 2
    fig = Figure(figsize=(5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels)
    _plot_stages(axes[0], r)
    _plot_frames(axes[1], r)
    if panels == 3:
        _plot_roofline(axes[2], r["roofline"])
    title = (f"tmanet bench: {r['backend_detail']}  {r['input_size'][0]}x{r['input_size'][1]}  "
             f"T={r['sequence_num']}")
    if "speedup_vs_official" in r:
        title += f"  ({r['speedup_vs_official']:.2f}x the official protocol)"
    fig.suptitle(title, fontsize=9)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_stages(ax, r):
    rows = [(s, r["stages_ms"][s]) for s in STAGES] + [("total", r["latency_ms"])]
    if "official_latency_ms" in r:
        rows.append(("official", r["official_latency_ms"]))
    names = [n for n, _ in rows]
    p50 = np.array([st["p50"] for _, st in rows])
    x = np.arange(len(rows))
    colours = ["tab:blue"] * len(STAGES) + ["tab:green"] + ["tab:red"] * (len(rows) - len(STAGES) - 1)
    ax.bar(x, p50, color=colours, label="p50")
    for q, marker in (("p90", "_"), ("p99", "v")):
        tops = np.array([st[q] for _, st in rows])
        ax.vlines(x, p50, tops, color="black", linewidth=1)
        ax.scatter(x, tops, marker=marker, color="black", s=30, label=q, zorder=3)
    ax.set_xticks(x, names, rotation=30)
    ax.set_ylabel("ms per frame")
    ax.set_title("stages: p50 bars, p90 / p99 whiskers", fontsize=9)
    ax.legend(fontsize=8)


def _plot_frames(ax, r):
    ms = np.asarray(r["frame_latency_ms"])
    ax.plot(np.arange(len(ms)), ms, marker=".", linewidth=1)
    if r["warmup"]:
        ax.axvspan(-0.5, r["warmup"] - 0.5, color="0.85", label="warm-up")
        ax.legend(fontsize=8)
    ax.set_xlabel("frame")
    ax.set_ylabel("ms")
    ax.set_title("latency of every frame", fontsize=9)


def _plot_roofline(ax, roof):
    names = list(ENGINE_GRAPHS)
    achieved = [roof[n]["tflops"] * 1e3 for n in names]
    ax.bar(names, achieved, color="tab:blue", label="achieved")
    ax.axhline(roof["peak_tflops"] * 1e3, color="tab:red", linestyle="--", label="GEMM peak (probed)")
    for i, n in enumerate(names):
        ax.text(i, achieved[i], f"{100 * roof[n]['fraction_of_peak']:.0f}%\n{roof[n]['gflop']:.1f} GFLOP",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.25 * max(achieved + [roof["peak_tflops"] * 1e3]))
    ax.set_ylabel("GFLOP/s")
    ax.set_title("roofline: " + roof["probe"], fontsize=8)
    ax.legend(fontsize=8, loc="lower right")


def write_json(r: dict, path):
    safe_files.write_json(path, r)
