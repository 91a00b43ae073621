"""Measure ``tmanet batch`` on this machine, every number from one process run (ratios only mean something
inside one run on a shared machine): workers x threads splits of the same cores, and Ray's overhead against
``tmanet run`` on one input.

``python -m tmanet.runtime.batch_bench EXPORT_DIR CLIP.npy [--copies N] [--chunk-frames F] [--repeat R]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tmanet(*args) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tmanet", *map(str, args)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _batch(export, inputs, work: Path, *flags) -> dict:
    out, summary = work / "out", work / "summary.json"
    shutil.rmtree(out, ignore_errors=True)
    wall = _tmanet("batch", export, *inputs, "--out", out, "--json", summary, "--no-progress", *flags)
    result = json.loads(summary.read_text())
    result["wall"] = wall  # the whole command: Python and Ray start-up included
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir")
    p.add_argument("clip", help="a .npy clip of the export size")
    p.add_argument("--copies", type=int, default=2, help="inputs of the split runs (copies of the clip)")
    p.add_argument("--chunk-frames", type=int, default=12)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tmanet-batch-bench-"))
    try:
        inputs = []
        for k in range(a.copies):
            inputs.append(work / f"clip{k}.npy")
            shutil.copy(a.clip, inputs[-1])
        frames = None
        rows = {name: [] for name in ("run", "batch 1 input", "1x2", "2x1", "1x1")}
        for _ in range(a.repeat):
            shutil.rmtree(work / "run", ignore_errors=True)
            rows["run"].append({"wall": _tmanet("run", a.export_dir, "-i", inputs[0], "--save-masks",
                                                work / "run", "--threads", "2", "--no-progress")})
            rows["batch 1 input"].append(_batch(a.export_dir, inputs[:1], work, "--workers", "1",
                                                "--threads-per-worker", "2"))
            for name, workers, threads in (("1x2", 1, 2), ("2x1", 2, 1), ("1x1", 1, 1)):
                rows[name].append(_batch(a.export_dir, inputs, work, "--workers", workers, "--threads-per-worker",
                                         threads, "--chunk-frames", a.chunk_frames))
            frames = rows["1x2"][-1]["frames"]
        print(f"{a.copies} inputs, {frames} frames, chunks of {a.chunk_frames}; {a.repeat} repeats (min..max)")

        def span(values, fmt="{:.2f}"):
            return f"{fmt.format(min(values))}..{fmt.format(max(values))}"

        print(f"  tmanet run, 1 input, 2 threads: wall {span([r['wall'] for r in rows['run']])} s")
        one = rows["batch 1 input"]
        print(f"  tmanet batch, same input, 1 worker x 2 threads: wall {span([r['wall'] for r in one])} s, of which "
              f"start-up (Ray, workers ready) {span([r['startup_seconds'] for r in one])} s")
        steady = {}
        for name in ("1x2", "2x1", "1x1"):
            fps = [r["frames"] / (r["seconds"] - r["startup_seconds"]) for r in rows[name]]
            steady[name] = fps
            print(f"  workers x threads {name}: {span(fps)} frames/s after start-up "
                  f"({span([r['frames_per_second'] for r in rows[name]])} frames/s with it)")
        eff = [b / (2 * c) for b, c in zip(steady["2x1"], steady["1x1"])]
        ratio = [b / c for b, c in zip(steady["2x1"], steady["1x2"])]
        print(f"  2x1 / 1x2 (same 2 cores): {span(ratio)}; scaling efficiency 2x1 vs 2 x (1x1): {span(eff)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
