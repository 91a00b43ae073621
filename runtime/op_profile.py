"""Per-operator time of an export's two ONNX graphs, from ONNX Runtime's own profiler (``tmanet bench
--profile DIR``).

Each graph gets a session of its own, opened as the runtime opens it (:func:`~tmanet.onnx_session.cpu_session`,
same thread count) with the profiler on, and runs ``runs`` times (after one untimed warm-up run) on inputs of
its real shapes: the frame engine on a synthetic clip frame, the head on the frame engine's outputs. ONNX
Runtime records every kernel of every run (``<node>_kernel_time`` events); the table sums them per node and
per op type over the timed runs and divides by their count. The nodes are the optimised graph's (fused
``FusedMatMul``, NCHWc ``Conv``, inserted ``ReorderInput``/``ReorderOutput``), which is what runs.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from tmanet.manifest import FRAME_ENCODER, MEMORY_HEAD, head_input_names, load_manifest
from tmanet.onnx_session import cpu_session
from tmanet.safe_files import atomic_directory

GRAPHS = {"frame_engine": FRAME_ENCODER, "head": MEMORY_HEAD}
KERNEL_SUFFIX = "_kernel_time"
PROFILE_FILES = ("frame_engine_trace.json", "head_trace.json", "ops.json")


def kernel_table(events: list, skip_runs: int = 1) -> dict:
    """Sum the kernel events of an ORT trace after its first ``skip_runs`` runs (``model_run`` events):
    ``{"runs": n, "run_ms": [per run], "per_node": {name: {"op", "ms"}}, "per_op": {op: ms}}``, times per run."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) <= skip_runs:
        raise ValueError(f"the trace holds {len(runs)} runs, need more than the {skip_runs} skipped")
    start = runs[skip_runs]["ts"]
    timed = runs[skip_runs:]
    per_node: dict[str, dict] = {}
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(KERNEL_SUFFIX) or e["ts"] < start:
            continue
        name, op = e["name"][:-len(KERNEL_SUFFIX)], e["args"]["op_name"]
        node = per_node.setdefault(name, {"op": op, "ms": 0.0})
        node["ms"] += e["dur"] / 1e3 / len(timed)
        per_op[op] += e["dur"] / 1e3 / len(timed)
    return {"runs": len(timed), "run_ms": [r["dur"] / 1e3 for r in timed], "per_node": per_node,
            "per_op": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def check_profile_dir(path):
    """Raise :class:`~tmanet.errors.UserError` unless ``path`` is new, empty or an earlier profile (holding
    only the files :func:`profile_export` writes): it is replaced whole."""
    from tmanet.errors import UserError
    path = Path(path)
    if path.is_dir():
        other = sorted(p.name for p in path.iterdir() if p.name not in PROFILE_FILES)
        if other:
            raise UserError(f"--profile {path} holds files that are not a profile ({', '.join(other[:3])}): "
                            "give a new or empty folder")


def _profiled(path: Path, prefix: Path, threads, feeds: dict, runs: int) -> tuple[dict, list, Path]:
    """Run one graph ``runs + 1`` times under the profiler: (its kernel table, its last outputs, the trace)."""
    session = cpu_session(path, threads, profile_prefix=prefix)
    for _ in range(runs + 1):
        outputs = session.run(None, feeds)
    trace = Path(session.end_profiling())
    return kernel_table(json.loads(trace.read_text())), outputs, trace


def profile_export(export_dir, out_dir, runs: int = 20, threads: int | None = None, seed: int = 0) -> dict:
    """Profile both graphs of ``export_dir``; write into ``out_dir`` (replaced whole when complete) each graph's
    Chrome trace (``<engine>_trace.json``, open it in chrome://tracing or Perfetto) and ``ops.json`` (the
    tables); return the tables ``{engine: kernel_table}``."""
    from tmanet.test_clips import make_noise_clip
    if runs < 1:
        raise ValueError(f"profile runs must be >= 1, got {runs}")
    spec = load_manifest(export_dir)
    H, W = spec.input_size
    batch = spec.batch or 1
    frames = np.repeat(make_noise_clip(1, H, W, seed), batch, 0)
    T = spec.memory_frames
    tables = {}
    with atomic_directory(out_dir) as stage, tempfile.TemporaryDirectory() as tmp:
        enc_table, (qk, qv, mk, mv), enc_trace = _profiled(
            Path(export_dir) / FRAME_ENCODER, Path(tmp) / "frame_engine", threads, {"frames": frames}, runs)
        head_feeds = dict(zip(head_input_names(T), [qk, qv, *(np.ascontiguousarray(mk[:, i]) for i in range(T)),
                                                    *(np.ascontiguousarray(mv[:, i]) for i in range(T))]))
        head_table, _, head_trace = _profiled(Path(export_dir) / MEMORY_HEAD, Path(tmp) / "head", threads,
                                              head_feeds, runs)
        tables = {"frame_engine": enc_table, "head": head_table}
        shutil.move(enc_trace, stage / "frame_engine_trace.json")
        shutil.move(head_trace, stage / "head_trace.json")
        (stage / "ops.json").write_text(json.dumps(tables, indent=1))
    return tables


def format_tables(tables: dict, top: int = 12) -> list[str]:
    """Per engine: the median run and the op types by time per run, then its ``top`` costliest nodes."""
    lines = []
    for engine, t in tables.items():
        total = sum(t["per_op"].values())
        lines.append(f"profile {engine}: median run {np.median(t['run_ms']):.2f} ms, kernels {total:.2f} ms "
                     f"({t['runs']} runs)")
        lines.append("  " + ", ".join(f"{op} {ms:.2f}" for op, ms in t["per_op"].items() if ms >= 0.005))
        nodes = sorted(t["per_node"].items(), key=lambda kv: -kv[1]["ms"])[:top]
        lines += [f"    {n['ms']:7.2f} ms  {n['op']:<14} {name}" for name, n in nodes]
    return lines
