"""Which layers stay float32 in the CPU INT8 graphs: a per-layer sensitivity sweep.

Every quantizable node (each Conv / MatMul outside the attention read, both engines) is quantized **alone**
(the rest float32) and the masks of sweep frames are compared with the float32 export's: the disagreement it
causes is its sensitivity. Then, from the fully quantized graphs, nodes go back to float32 one by one, the most
sensitive per multiply-add first (a 1x1 shortcut convolution that hurts as much as a 3x3 one costs a ninth of
its int8 speed), until the sweep frames reach ``target`` pixel agreement or the kept nodes hold ``max_work`` of
the multiply-adds. The target is well above the 99 % gate: the sweep frames are calibration frames, on which
int8 errs about a quarter as often as on unseen clips (measured on the demo model). Ranges are calibrated once per engine
(:class:`~.cpu_quantize.RangeCache`), so each placement costs one quantizer pass and a few frames.

The sweep frames are calibration frames (what the recipe is tuned on); the gate never is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tmanet.memory import MemoryStepper
from tmanet.onnx_session import cpu_session

from .cpu_quantize import quantizable_nodes, quantize_cpu_int8

log = logging.getLogger("tmanet")

ENGINES = ("frame_encoder", "memory_head")
SWEEP_TARGET = 0.997   # sweep frames' agreement to reach: the gate is 99 % on unseen clips
MAX_WORK = 0.4         # at most this share of the quantizable multiply-adds goes back to float32


@dataclass
class SweepResult:
    sensitivity: dict                                   # engine -> {node: disagreement when only it is int8}
    kept: dict = field(default_factory=dict)            # engine -> [nodes kept float32], in the order chosen
    work: dict = field(default_factory=dict)            # engine -> {node: share of the quantizable MACs}
    steps: list = field(default_factory=list)           # (kept so far, sweep agreement) after each step

    def to_dict(self) -> dict:
        top = {e: dict(sorted(s.items(), key=lambda kv: -kv[1])[:12]) for e, s in self.sensitivity.items()}
        return {"target": SWEEP_TARGET, "max_work": MAX_WORK, "kept": self.kept, "steps": self.steps,
                "most_sensitive": top, "sensitivity": self.sensitivity, "work": self.work}


class _Evaluator:
    """Streams the sweep frames through a (frame graph, head graph) pair on ONNX Runtime, in order through the
    memory ring, and returns the masks."""

    def __init__(self, streams, batch: int, threads: int | None = None):
        self.streams, self.batch, self.threads = streams, batch, threads

    def masks(self, frame_path, head_path) -> np.ndarray:
        fs, hs = cpu_session(frame_path, self.threads), cpu_session(head_path, self.threads)
        T = len([i for i in hs.get_inputs() if i.name.startswith("memory_key_")])
        out = []

        def encode(batch):
            return fs.run(["query_key", "query_value", "memory_key", "memory_value"], {"frames": batch})

        def head(qk, qv, keys, values):
            feed = {"query_key": qk, "query_value": qv}
            feed.update({f"memory_key_{i}": np.ascontiguousarray(keys[i]) for i in range(T)})
            feed.update({f"memory_value_{i}": np.ascontiguousarray(values[i]) for i in range(T)})
            return hs.run(["mask"], feed)[0]

        for stream in self.streams:
            stepper = MemoryStepper(encode, head)
            for frame in stream:
                batch = np.ascontiguousarray(np.broadcast_to(frame, (self.batch, *frame.shape)))
                out.append(stepper.step(batch)[0])
        return np.stack(out)


def sweep(graphs: dict, fp32: dict, readers: dict, ranges: dict, streams, batch: int, workdir,
          keep_modules: dict, target: float = SWEEP_TARGET, max_work: float = MAX_WORK, threads=None,
          progress: bool = True) -> SweepResult:
    """``graphs`` / ``fp32``: engine -> named float32 graph path (the same graphs: ``fp32`` is what the
    reference runs). ``readers`` / ``ranges``: each engine's calibration reader and range cache. ``streams``:
    the sweep frames, a list of ``(F, H, W, 3)`` streams. Only the engines in ``graphs`` are swept (the
    others run float32). Returns the sensitivities and the nodes to keep."""
    import onnx
    from tqdm import tqdm
    work = Path(workdir)
    ev = _Evaluator(streams, batch, threads)
    reference = ev.masks(fp32["frame_encoder"], fp32["memory_head"])
    swept = [e for e in ENGINES if e in graphs]
    models = {e: onnx.load(str(graphs[e]), load_external_data=False) for e in swept}
    candidates = {e: [n.name for n in quantizable_nodes(models[e])] for e in swept}
    macs = {e: conv_macs(models[e], candidates[e], batch) for e in swept}
    total_macs = max(1, sum(sum(m.values()) for m in macs.values()))
    share = {e: {n: m / total_macs for n, m in macs[e].items()} for e in swept}

    def place(engine, keep_nodes, only=None) -> Path:
        """The engine's graph with ``keep_nodes`` float32 (or, with ``only``, every candidate but it)."""
        nodes = keep_nodes if only is None else [n for n in candidates[engine] if n != only]
        path = work / f"sweep_{engine}.onnx"  # ONNX Runtime reads it into the session before the next
        quantize_cpu_int8(graphs[engine], path, readers[engine], ranges[engine],
                          keep_modules=keep_modules.get(engine, ()), keep_nodes=nodes)
        return path

    def agreement(paths) -> float:
        return float(np.mean(ev.masks(paths["frame_encoder"], paths["memory_head"]) == reference))

    total = sum(len(c) for c in candidates.values())
    sensitivity = {e: {} for e in swept}
    with tqdm(total=total, desc="int8 sensitivity sweep", unit="layer", disable=not progress) as bar:
        for engine in swept:
            for node in candidates[engine]:
                paths = dict(fp32)
                paths[engine] = place(engine, [], only=node)
                sensitivity[engine][node] = 1.0 - agreement(paths)
                bar.update()
    result = SweepResult(sensitivity, {e: [] for e in swept}, share)
    ranked = sorted(((s / max(share[e][n], 1e-6), s, e, n) for e, nodes in sensitivity.items()
                     for n, s in nodes.items() if s > 0), reverse=True)
    paths = {**fp32, **{e: place(e, []) for e in swept}}
    score = agreement(paths)
    result.steps.append({"kept": 0, "agreement": score, "work_kept": 0.0})
    kept_work = 0.0
    for _, s, engine, node in ranked:
        if score >= target:
            break
        if kept_work + share[engine][node] > max_work or len(result.kept[engine]) + 1 == len(candidates[engine]):
            continue  # over the budget, or the engine's last int8 convolution (an INT8 engine keeps one)
        kept_work += share[engine][node]
        result.kept[engine].append(node)
        paths[engine] = place(engine, result.kept[engine])
        score = agreement(paths)
        result.steps.append({"kept": sum(len(k) for k in result.kept.values()), "engine": engine, "node": node,
                             "agreement": score, "work_kept": kept_work})
        log.info("sweep: %s %s float32 -> %.3f %% on the sweep frames", engine, node, 100 * score)
    return result


def conv_macs(model, names, batch: int) -> dict:
    """Multiply-adds of the named Conv / MatMul nodes at the graph's shapes (batch ``batch``)."""
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes[v.name] = [d.dim_value or batch for d in v.type.tensor_type.shape.dim]
    wanted, out = set(names), {}
    for n in model.graph.node:
        if n.name in wanted:
            y, w = shapes.get(n.output[0], [0]), shapes.get(n.input[1], [0])
            reduce = int(np.prod(w[1:])) if n.op_type == "Conv" else (w[-2] if len(w) >= 2 else 1)
            out[n.name] = int(np.prod(y)) * reduce
    return out


__all__ = ["sweep", "SweepResult", "conv_macs", "SWEEP_TARGET", "MAX_WORK"]
