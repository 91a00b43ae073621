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
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tmanet import safe_files
from tmanet.safe_files import atomic_file

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
    from tmanet.synthetic_weights import make_clip
    return make_clip(count, height, width, seed)


# -- the official protocol --------------------------------------------------------------------------------
class OfficialProtocol:
    """The official test protocol on the manifest's checkpoint: ``TMANet.forward`` in torch eager (BatchNorm
    unfolded), the backbone on the frame and on each of its T memory frames ``t-T..t-1`` (clamped to frame 0),
    plus normalisation and argmax. ``frame(t)`` returns stream 0's mask and the latency in ms."""

    def __init__(self, manifest: dict, clip: np.ndarray, streams: int, device: str = "cpu",
                 threads: int | None = None):
        import torch

        from tmanet.checkpoints import load_model
        from tmanet.presets import ModelConfig
        from .backends import resolve_checkpoint
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        path = resolve_checkpoint(Path(manifest["directory"]), manifest)
        self.model = load_model(path, ModelConfig.from_dict(manifest["config"])).to(device).eval()
        self.clip, self.streams, self.device = clip, streams, device
        self.T = self.model.config.sequence_num
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
def run_bench(export_dir, backend: str = "ort", device: str = "cpu", frames: int = 50, warmup: int = 5,
              compare_official: bool = False, official_frames: int | None = None, threads: int | None = None,
              seed: int = 0, progress: bool = True, backend_options: dict | None = None) -> dict:
    """Stream ``warmup + frames`` synthetic frames at the export size and time the last ``frames``.

    With ``compare_official`` the official protocol runs on the first ``official_frames`` timed frames,
    interleaved frame by frame with the streaming runtime, so both see the same machine load (timings on a
    shared machine drift over minutes). Its model is loaded before the runtime and the peak-RSS mark is reset
    after each official frame, so the memory figures are the runtime's alone. ``backend_options`` go to the
    backend (e.g. ``precision="fp16"``, ``cuda_graphs=True`` for torch on CUDA); the official protocol always
    runs in float32 eager."""
    from tqdm import tqdm

    from tmanet.export.manifest import load_manifest
    from .segmenter import StreamingSegmenter
    if frames < 1 or warmup < 0:
        raise ValueError(f"frames must be >= 1 and warmup >= 0, got {frames} and {warmup}")
    manifest = load_manifest(export_dir)
    H, W = manifest["input_size"]
    streams = 1 if manifest["batch"] == "dynamic" else int(manifest["batch"])
    clip = bench_frames(warmup + frames, H, W, seed)
    options = dict(backend_options or {})
    if threads:
        options["threads"] = threads
    n_official = min(official_frames or frames, frames) if compare_official else 0
    official = OfficialProtocol(manifest, clip, streams, device, threads) if n_official else None

    gpu = CudaMemoryProbe(device) if backend == "torch" and device.startswith("cuda") else None
    gpu_before = gpu.reset() if gpu else 0
    gpu_peak = gpu_official_peak = 0
    probe = RssProbe()
    probe.reset_peak()
    rss_before = probe.current()
    seg = StreamingSegmenter.open(export_dir, backend=backend, device=device, **options)
    timer = ProfilingTimer(probe, sync=_sync_for(backend, device))
    timer.overall_peak = probe.peak()   # loading the engines counts too
    rss_loaded = probe.current()
    seg.timer = timer
    totals, stages, masks = [], {s: [] for s in STAGES}, []
    official_ms, agreement = [], []
    bar = tqdm(range(warmup + frames), desc=f"bench {backend}" + (" + official" if official else ""),
               unit="frame", disable=not progress)
    for i in bar:
        frame = clip[i]
        start = time.perf_counter()
        if streams == 1:
            res = [seg.push(frame)]
        else:
            res = seg.push_batch(np.repeat(frame[None], streams, 0))
        elapsed = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            totals.append(elapsed)
            for s in STAGES:
                stages[s].append(timer.last[s] * 1e3)
            masks.append(res[0].mask)
        if gpu:
            gpu_peak = max(gpu_peak, gpu.peak())
        if official is not None and (i == warmup - 1 or warmup <= i < warmup + n_official):
            timer.overall_peak = max(timer.overall_peak, probe.peak())
            start_bytes = gpu.reset() if gpu else 0
            mask, ms = official.frame(i)
            probe.reset_peak()  # the official model's transient memory is not the runtime's
            if gpu:
                gpu_official_peak = max(gpu_official_peak, gpu.peak() - start_bytes)
                gpu.reset()
            if i >= warmup:     # the frame before the timed ones warms the official model up
                official_ms.append(ms)
                agreement.append(float(np.mean(mask == res[0].mask)))
    peak = max(timer.overall_peak, probe.peak())
    described = seg.backend.describe()
    seg.close()

    total = summarize(totals)
    report = {
        "export": str(Path(export_dir).resolve()),
        "backend": backend,
        "backend_detail": described,
        "device": device,
        "preset": manifest.get("preset"),
        "input_size": [H, W],
        "sequence_num": manifest["sequence_num"],
        "batch": manifest["batch"],
        "streams": streams,
        "precision": manifest.get("precision"),
        "backend_options": dict(backend_options or {}),
        "frames": frames,
        "warmup": warmup,
        "fps": streams * 1e3 / total["mean"],
        "latency_ms": total,
        "stages_ms": {s: summarize(v) for s, v in stages.items()},
        "peak_memory_mb": (peak - rss_before) / MB,
        "peak_rss_mb": peak / MB,
        "loaded_memory_mb": (rss_loaded - rss_before) / MB,
        "stage_peak_memory_mb": ({s: v / MB for s, v in timer.stage_peak.items()} if probe.resettable else None),
        "memory_method": probe.method,
        "cuda_peak_memory_mb": (gpu_peak - gpu_before) / MB if gpu else None,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
    }
    if official is not None:
        st = summarize(official_ms)
        report["official_frames"] = n_official
        report["official_latency_ms"] = st
        report["official_fps"] = streams * 1e3 / st["mean"]
        # Same frames: compare with the runtime's latency on exactly those frames.
        report["speedup_vs_official"] = st["mean"] / float(np.mean(totals[:n_official]))
        report["speedup_vs_official_all_frames"] = report["fps"] / report["official_fps"]
        report["mask_agreement_vs_official"] = float(np.mean(agreement))
        report["official_threads"] = official.torch.get_num_threads()
        if gpu:
            report["official_cuda_peak_memory_mb"] = gpu_official_peak / MB
    return report


def _sync_for(backend, device):
    if backend == "torch" and device.startswith("cuda"):
        import torch
        return torch.cuda.synchronize
    return None


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
    return "\n".join(lines)


def plot_report(r: dict, path):
    """A bar chart PNG of the stage latencies (and the official protocol's) drawn with Pillow."""
    from PIL import Image, ImageDraw
    bars = [(s, r["stages_ms"][s]["mean"]) for s in STAGES] + [("total", r["latency_ms"]["mean"])]
    if "official_latency_ms" in r:
        bars.append(("official", r["official_latency_ms"]["mean"]))
    width, row, left, right, top = 720, 34, 110, 150, 50
    height = top + row * len(bars) + 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    title = f"tmanet bench: {r['backend']} {r['input_size'][0]}x{r['input_size'][1]} T={r['sequence_num']}"
    if "speedup_vs_official" in r:
        title += f"  speedup {r['speedup_vs_official']:.2f}x"
    d.text((10, 12), title, fill="black")
    scale = (width - left - right) / max(v for _, v in bars) if bars else 1
    for i, (name, value) in enumerate(bars):
        y = top + i * row
        colour = {"total": (40, 90, 170), "official": (190, 70, 50)}.get(name, (110, 150, 200))
        d.text((10, y + 8), name, fill="black")
        d.rectangle([left, y + 4, left + max(1, int(value * scale)), y + row - 8], fill=colour)
        d.text((left + int(value * scale) + 8, y + 8), f"{value:.2f} ms", fill="black")
    d.text((10, height - 22), "mean latency per frame", fill=(90, 90, 90))
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def write_json(r: dict, path):
    safe_files.write_json(path, r)
