"""Serving vs in-process, in one run: N camera sequences through a Triton server (gRPC, one client thread
per sequence, each sending its next frame when the previous answer is back) and the same frames in-process
through ``push_batch`` (all N streams per call). Reports aggregate frames/s and latency percentiles of both
(serving: one request's round trip; in-process: one push_batch, the time each camera's frame waits), and
their ratios. The two alternate over ``rounds`` rounds so that a busy machine slows both alike."""
from __future__ import annotations

import threading
import time

import numpy as np

from .bench import summarize
from tmanet.manifest import load_manifest


def sequence_clips(streams: int, frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    from tmanet.test_clips import make_noise_clip
    return [make_noise_clip(frames, height, width, seed + s) for s in range(streams)]


def bench_in_process(export_dir, clips, warmup: int, threads=None) -> tuple[float, list[float]]:
    """(timed wall seconds, push_batch latencies)."""
    from .segmenter import StreamingSegmenter
    options = {"threads": threads} if threads else {}
    n = len(clips)
    with StreamingSegmenter.open(export_dir, num_streams=n, **options) as seg:
        steps = [np.ascontiguousarray(np.stack([c[t] for c in clips])) for t in range(len(clips[0]))]
        for batch in steps[:warmup]:
            seg.push_batch(batch)
        latencies = []
        start = time.perf_counter()
        for batch in steps[warmup:]:
            t0 = time.perf_counter()
            seg.push_batch(batch)
            latencies.append(time.perf_counter() - t0)
        return time.perf_counter() - start, latencies


def bench_triton(url: str, model: str, clips, warmup: int, first_id: int = 1) -> tuple[float, list[float]]:
    """(timed wall seconds, request round trips) with one thread and one gRPC client per sequence."""
    import tritonclient.grpc as grpcclient
    n = len(clips)
    latencies = [[] for _ in range(n)]
    errors = []
    barrier = threading.Barrier(n + 1)

    def run(s):
        try:
            client = grpcclient.InferenceServerClient(url)
            out = [grpcclient.InferRequestedOutput("MASK")]
            clip = clips[s]
            for t, frame in enumerate(clip):
                if t == warmup:
                    barrier.wait()  # timing starts when every sequence is warm
                inp = grpcclient.InferInput("FRAME", [1, *frame.shape], "UINT8")
                inp.set_data_from_numpy(frame[None])
                t0 = time.perf_counter()
                client.infer(model, [inp], outputs=out, sequence_id=first_id + s, sequence_start=t == 0,
                             sequence_end=t == len(clip) - 1)
                if t >= warmup:
                    latencies[s].append(time.perf_counter() - t0)
        except Exception as e:  # reported by the caller, with the sequence
            errors.append(f"sequence {first_id + s}: {e}")
            barrier.abort()

    workers = [threading.Thread(target=run, args=(s,), daemon=True) for s in range(n)]
    for w in workers:
        w.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError("; ".join(errors))
    return wall, [x for lat in latencies for x in lat]


def bench_serving(export_dir, url: str, model: str, streams: int, frames: int, warmup: int,
                  threads=None, rounds: int = 3) -> dict:
    H, W = load_manifest(export_dir).input_size
    # Every frame asked for is timed: the rounds share them (the first rounds take one more where they don't divide).
    per_round = [frames // rounds + (r < frames % rounds) for r in range(rounds)]
    measured = {"triton": [0.0, []], "in_process": [0.0, []]}
    for r in range(rounds):
        clips = sequence_clips(streams, warmup + per_round[r], H, W, seed=r * streams)
        for name, (wall, lat) in (("triton", bench_triton(url, model, clips, warmup, first_id=1 + r * streams)),
                                  ("in_process", bench_in_process(export_dir, clips, warmup, threads))):
            measured[name][0] += wall
            measured[name][1] += lat
    out = {name: {"fps": streams * frames / wall, "latency_ms": summarize(np.asarray(lat) * 1e3)}
           for name, (wall, lat) in measured.items()}
    served = out["triton"]
    return {"streams": streams, "frames_per_stream": frames, "warmup": warmup, "rounds": rounds,
            "input_size": [H, W], **out, "throughput_ratio": served["fps"] / out["in_process"]["fps"],
            "triton_p99_over_p50": served["latency_ms"]["p99"] / served["latency_ms"]["p50"]}


def format_report(r: dict) -> str:
    lines = [f"{r['streams']} sequences x {r['frames_per_stream']} frames in {r['rounds']} alternating rounds "
             f"(+{r['warmup']} warm-up each), {r['input_size'][0]}x{r['input_size'][1]}",
             f"{'':12s} {'frames/s':>9s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}"]
    for name in ("triton", "in_process"):
        x, ms = r[name], r[name]["latency_ms"]
        lines.append(f"{name:12s} {x['fps']:9.1f} {ms['p50']:8.1f} {ms['p90']:8.1f} {ms['p99']:8.1f}")
    lines.append(f"serving throughput = {100 * r['throughput_ratio']:.1f} % of in-process; "
                 f"serving p99/p50 = {r['triton_p99_over_p50']:.2f}")
    return "\n".join(lines)
