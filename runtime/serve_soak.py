"""Soak of ``tmanet serve``: does the server's resident memory stay flat over long sequences?

``python -m tmanet.runtime.serve_soak EXPORT_DIR`` writes a temporary model repository for the export, starts
``tmanet serve`` on free loopback ports (the command users run, as a subprocess), drives N concurrent
sequences of F frames over gRPC (one client per sequence) and samples the resident memory (VmRSS) of
tritonserver and its descendants (the Python backend stubs, where the model runs). The baseline is taken when
every sequence has sent ``--warm`` frames (arenas, caches and the ring are allocated by then); the report gives
the growth from there to the end and to the peak, and fails (exit 1) when the end exceeds ``--limit-mb``.
A benchmark script, not a test: memory is a property of a long run."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from tmanet.manifest import load_manifest

SAMPLE_EVERY_S = 0.5


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and its descendants, MB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(pid)
    total_kb, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total_kb += int(found.group(1)) if found else 0
    return total_kb / 1024


def start_serve(repo: Path, deadline_s: float = 300.0) -> tuple[subprocess.Popen, int, str]:
    """(the ``tmanet serve`` process, tritonserver's pid, gRPC address) once it printed its ready line."""
    from .serve import free_ports
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "tmanet.cli", "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--timeout", str(deadline_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # ends at EOF if serve exits
        if "ready:" in line:
            return proc, int(re.search(r"\(pid (\d+)\)", line).group(1)), f"127.0.0.1:{grpc}"
    proc.wait()
    raise RuntimeError(f"tmanet serve exited with status {proc.returncode} before it was ready")


def drive(url: str, model: str, clips, warm: int, on_warm, bar) -> None:
    """Every clip as one sequence (one thread and client each); ``on_warm()`` once all have sent ``warm``."""
    import tritonclient.grpc as grpcclient
    errors = []
    barrier = threading.Barrier(len(clips), action=on_warm)

    def run(s):
        try:
            client = grpcclient.InferenceServerClient(url)
            out = [grpcclient.InferRequestedOutput("MASK")]
            for t, frame in enumerate(clips[s]):
                if t == warm:
                    barrier.wait()
                inp = grpcclient.InferInput("FRAME", [1, *frame.shape], "UINT8")
                inp.set_data_from_numpy(frame[None])
                client.infer(model, [inp], outputs=out, sequence_id=1 + s, sequence_start=t == 0,
                             sequence_end=t == len(clips[s]) - 1)
                bar.update()
        except Exception as e:  # reported with its sequence
            errors.append(f"sequence {1 + s}: {e}")
            barrier.abort()

    workers = [threading.Thread(target=run, args=(s,), daemon=True) for s in range(len(clips))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError("; ".join(errors))


def soak(export_dir, streams: int = 8, frames: int = 250, warm: int = 50, threads=None, progress=True) -> dict:
    from tqdm import tqdm


    from .serve_bench import sequence_clips
    from .triton_repo import write_triton_repo
    H, W = load_manifest(export_dir).input_size
    clips = sequence_clips(streams, frames, H, W)
    with tempfile.TemporaryDirectory(prefix="tmanet-serve-soak-") as tmp:
        write_triton_repo(export_dir, f"{tmp}/repo", max_sequences=streams, threads=threads)
        proc, triton, url = start_serve(Path(tmp) / "repo")
        samples, marks, stop = [], {}, threading.Event()

        def on_warm():  # every sequence has sent `warm` frames: the baseline
            marks["warm"], marks["warm_sample"] = tree_rss_mb(triton), len(samples)

        def sample():
            while not stop.wait(SAMPLE_EVERY_S):
                samples.append(tree_rss_mb(triton))

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            marks["start"] = tree_rss_mb(triton)
            sampler.start()
            started = time.perf_counter()
            with tqdm(total=streams * frames, desc="soak", unit="frame", disable=not progress) as bar:
                drive(url, "tmanet", clips, warm, on_warm, bar)
            wall = time.perf_counter() - started
            marks["end"] = tree_rss_mb(triton)
        finally:
            stop.set()
            proc.terminate()
            proc.wait(timeout=120)
    peak = max([marks["end"], *samples[marks.pop("warm_sample"):]])
    return {"streams": streams, "frames": frames, "warm_frames": warm, "input_size": [H, W],
            "frames_per_s": streams * frames / wall, "rss_mb": {k: round(v, 1) for k, v in marks.items()},
            "rss_peak_mb": round(peak, 1),
            "growth_after_warm_mb": round(marks["end"] - marks["warm"], 1),
            "peak_over_warm_mb": round(peak - marks["warm"], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tmanet.runtime.serve_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("--streams", type=int, default=8, metavar="N", help="concurrent sequences (default 8)")
    p.add_argument("--frames", type=int, default=250, metavar="F", help="frames per sequence (default 250)")
    p.add_argument("--warm", type=int, default=50, metavar="F", help="frames before the baseline (default 50)")
    p.add_argument("--limit-mb", type=float, default=50.0, help="allowed growth after the baseline (default 50)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads in the server")
    p.add_argument("--json", metavar="F", help="write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.warm < args.frames or args.streams < 1:
        p.error("need --streams >= 1 and 0 < --warm < --frames")
    r = soak(args.export_dir, args.streams, args.frames, args.warm, args.threads, not args.no_progress)
    print(f"{r['streams']} sequences x {r['frames']} frames at {r['input_size'][0]}x{r['input_size'][1]}: "
          f"{r['frames_per_s']:.1f} frames/s; server RSS {r['rss_mb']['start']:.0f} MB at start, "
          f"{r['rss_mb']['warm']:.0f} MB after {r['warm_frames']} frames, {r['rss_mb']['end']:.0f} MB at the end "
          f"(growth {r['growth_after_warm_mb']:+.1f} MB, peak {r['peak_over_warm_mb']:+.1f} MB over the baseline; "
          f"limit {args.limit_mb:g} MB)")
    if args.json:
        from tmanet.safe_files import write_json
        write_json(args.json, r)
    return 0 if r["growth_after_warm_mb"] < args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
