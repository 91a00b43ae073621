"""FP16 in the ONNX graph: ModelOpt AutoCast with the engine I/O kept as exported.

TensorRT 11 builds strongly typed networks, so FP16 has to be written into the ONNX graph itself. AutoCast
(``modelopt.onnx.autocast``) casts initializers and activations to float16 and inserts Cast nodes around what
stays float32. Decisions:

- **Engine I/O keeps its types** (``keep_io_types``): uint8 frames in, float32 query/memory encodings between
  the engines, uint8 mask and float32 logits out. The runtime, its float32 memory ring and every backend stay
  unchanged; the boundary casts are a handful of elementwise kernels next to a ResNet.
- **The attention read stays float32 by default**: the official read is ``softmax(q . k)`` with no 1/sqrt(C)
  scaling, so its logits grow with the key channels and the feature magnitudes and can overflow float16
  (65504) or lose the softmax's resolution. The MatMul producing the logits, the Softmax and the MatMul
  applying it are kept float32 (found by graph structure, so every query chunk of the export is covered);
  ``keep_attention_fp32=False`` leaves them to AutoCast's own rule like any other node.
- AutoCast's own safety rule still applies: a node whose float32 reference values exceed ``data_max`` (AutoCast
  default 512) stays float32. The reference values come from real calibration inputs (the frames, and the
  memory encodings streamed from them), not AutoCast's random data.

On ONNX Runtime's CPU provider float16 nodes without a float16 kernel run in float32 between inserted casts,
so the CPU measurement sees float16 weights and float16 tensors between nodes (rounding and overflow), with
float32 accumulation, as TensorRT does for its float16 convolutions.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path


log = logging.getLogger("tmanet")

PRECISIONS = ("fp32", "fp16", "int8")
AUTOCAST_DATA_MAX = 512.0  # AutoCast's default: float16 ULP is 0.5 at 512

# onnx.TensorProto element types we talk about.
FLOAT, UINT8, FLOAT16 = 1, 2, 10
DTYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


class PrecisionError(RuntimeError):
    """The precision conversion could not be done (missing tool, unexpected graph)."""


def require_modelopt():
    """The ``modelopt`` module, or a clear error naming the install line."""
    try:
        import modelopt
        import modelopt.onnx  # noqa: F401  (fails without onnxslim / onnx-graphsurgeon)
    except ImportError as e:
        raise PrecisionError(
            f"NVIDIA ModelOpt is not usable ({e}); install the quant extra: pip install -e '.[quant]' "
            "(nvidia-modelopt onnx-graphsurgeon onnxconverter-common ml_dtypes lief onnxslim)") from None
    return modelopt


def modelopt_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("nvidia-modelopt")
    except Exception:  # not installed
        return None


def name_unnamed_nodes(model) -> int:
    """Give every nameless node a unique name (node-name rules need them); returns how many were named."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"tmanet_node_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            count += 1
    return count


def attention_nodes(model) -> list[str]:
    """Names of the memory read's nodes: each Softmax, the MatMul feeding it (the q.k logits) and the MatMul
    consuming it (softmax . values). Found by structure: the export unrolls one such triple per query chunk.
    The ``place_read`` extension's Softmax comes with its own nodes (:func:`place_read_nodes`): its logits are
    the same unscaled q . k sums."""
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = []
    for n in model.graph.node:
        if n.op_type != "Softmax":
            continue
        names.append(n.name)
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "MatMul":
            names.append(src.name)
        names += [c.name for c in consumers.get(n.output[0], []) if c.op_type == "MatMul"]
        names += place_read_nodes(n, producer, consumers)
    return names


def place_read_nodes(softmax, producer, consumers) -> list[str]:
    """The place read around its Softmax: the ReduceSum(Mul(q, k)) feeding it (the per-slot logits) and the
    Unsqueeze -> Mul -> ReduceSum applying it to the values; [] around any other Softmax."""
    src = producer.get(softmax.input[0])
    if src is None or src.op_type != "ReduceSum":
        return []
    names = [src.name]
    mul = producer.get(src.input[0])
    if mul is not None and mul.op_type == "Mul":
        names.append(mul.name)
    node = softmax
    for op in ("Unsqueeze", "Mul", "ReduceSum"):
        nxt = [c for c in consumers.get(node.output[0], []) if c.op_type == op]
        if len(nxt) != 1:
            break
        node = nxt[0]
        names.append(node.name)
    return names


def module_of(node) -> str | None:
    """The torch module a node was exported from ('backbone.layer1.0.conv1'; '' for the top module), as
    ``torch.onnx.export`` records it in the node's metadata; None where the exporter recorded none."""
    import ast
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)  # the module scopes, then the node's own name
            return scopes[-2] if len(scopes) >= 2 else ""
    return None


def in_module(module: str | None, prefix: str) -> bool:
    """Whether ``module`` is the module ``prefix`` or inside it (dotted paths: 'backbone.layer1' holds
    'backbone.layer1.0.conv1', not 'backbone.layer10')."""
    return module is not None and (module == prefix or module.startswith(prefix + "."))


def module_names(model) -> list[str]:
    """Every module path recorded in the graph and all its parents, sorted ('backbone', 'backbone.layer1', ...)."""
    names = set()
    for node in model.graph.node:
        parts = (module_of(node) or "").split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0])
    return sorted(names)


def read_unquantized_adds(model) -> int:
    """Make every Add read the tensor a QuantizeLinear -> DequantizeLinear pair was fed instead of its
    dequantized copy, and drop Q/DQ nodes nothing reads any more; returns how many inputs were rewired.

    ModelOpt quantizes a residual block's identity input (TensorRT can then fuse the addition into an INT8
    convolution): the skip path then carries int8 rounding from block to block. Reading the unquantized tensor
    keeps the residual stream in high precision; the convolutions still read int8."""
    producer = {out: n for n in model.graph.node for out in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        for j, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[j] = q.input[0]
                rewired += 1
    freed = set()
    while True:  # unread Q/DQ nodes, dequantizers first, then their quantizers
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            freed.update(n.input)
            model.graph.node.remove(n)
    for init in [t for t in model.graph.initializer if t.name in freed - read]:  # their scales and zero points
        model.graph.initializer.remove(init)
    return rewired


def tensor_types(model) -> dict[str, int]:
    """Element type of every tensor (inputs, outputs, initializers, inferred intermediates)."""
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:  # Constant nodes are not in value_info when folded by inference
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def node_compute_types(model, names=None) -> dict[str, int]:
    """The element type of each node's first input (what the node computes in), by node name."""
    types = tensor_types(model)
    wanted = None if names is None else set(names)
    return {n.name: types.get(n.input[0], 0) for n in model.graph.node
            if (wanted is None or n.name in wanted) and n.input}


def io_types(model) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}


def io_signature(model) -> dict[str, tuple]:
    """Name -> (element type, dims) of every graph input and output; symbolic dims by name."""
    return {v.name: (v.type.tensor_type.elem_type,
                     tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
            for v in list(model.graph.input) + list(model.graph.output)}


def check_io_kept(before, after, what: str):
    """The runtime binds the engines by these names, types and shapes: a conversion must not change them."""
    a, b = io_signature(before), io_signature(after)
    if a != b:
        changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        raise PrecisionError(f"{what} changed the graph's inputs/outputs: {changed}")


def summarize(model) -> dict:
    """Counts that show what precision a graph runs in."""
    from collections import Counter
    inits = Counter(DTYPE_NAMES.get(t.data_type, str(t.data_type)) for t in model.graph.initializer)
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "initializers": dict(inits), "casts": ops.get("Cast", 0),
            "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)}


MODELOPT_LOGGERS = ("modelopt.onnx", "modelopt.onnx.autocast")


def tools_verbose() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def tools_log_level() -> str:
    """The level to hand ModelOpt (its quantize() reconfigures its loggers with it)."""
    return "INFO" if tools_verbose() else "ERROR"


@contextlib.contextmanager
def quiet():
    """Keep the tools' prints, progress bars and INFO logs off the console (``-v`` shows them): ModelOpt and
    ONNX Runtime's calibrators are chatty. What they printed is shown if they fail."""
    if tools_verbose():
        yield
        return
    buf = io.StringIO()
    saved = {name: logging.getLogger(name).level for name in MODELOPT_LOGGERS}
    try:
        for name in MODELOPT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        log.error("%s", buf.getvalue()[-4000:])
        raise
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def convert_fp16(src, dst, reference_data=None, keep_attention_fp32: bool = True,
                 data_max: float = AUTOCAST_DATA_MAX) -> dict:
    """Write the float16 version of the float32 graph ``src`` to ``dst`` with AutoCast (engine I/O types kept).

    ``reference_data``: an ``.npz`` file or a folder of them with real graph inputs (one batch each) for
    AutoCast's float32 reference run. Returns what was done (kept-float32 nodes, counts) for the manifest.
    """
    import onnx
    require_modelopt()
    from modelopt.onnx.autocast import convert_to_mixed_precision
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    renamed = name_unnamed_nodes(model)
    attention = attention_nodes(model)
    if renamed:  # AutoCast matches node names: give it the named copy
        src = dst.with_name(dst.stem + ".named.onnx")
        onnx.save(model, str(src))
    exclude = [f"^{re.escape(n)}$" for n in attention] if keep_attention_fp32 else []
    with quiet():
        converted = convert_to_mixed_precision(
            str(src), low_precision_type="fp16", nodes_to_exclude=exclude, keep_io_types=True,
            data_max=data_max, calibration_data=None if reference_data is None else str(reference_data),
            providers=["cpu"])
    if renamed:
        src.unlink()
    check_io_kept(model, converted, f"AutoCast on {dst.name}")
    onnx.save(converted, str(dst))
    ops = {n.name: n.op_type for n in converted.graph.node}
    kept = sorted(n for n, t in node_compute_types(converted).items() if t == FLOAT and ops[n] != "Cast")
    info = {"tool": "modelopt.onnx.autocast.convert_to_mixed_precision", "low_precision": "fp16",
            "keep_io_types": True, "keep_attention_fp32": keep_attention_fp32, "data_max": data_max,
            "attention_nodes": attention, "fp32_nodes": kept, **summarize(converted)}
    log.info("%s: float16 with %d of %d nodes kept float32%s", dst.name, len(kept), info["nodes"],
             " (attention read)" if keep_attention_fp32 and attention else "")
    return info
