"""``tmanet triton-repo``: a Triton Inference Server model repository serving an export as sequences.

Layout: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/model.py`` (the Python backend model,
:mod:`tmanet.runtime.triton_model`) with the export copied into ``1/export/`` (engines included when
``tmanet build`` wrote them there; for the torch backend, the checkpoint too). The model verifies the
manifest's SHA256 when it loads.

The contract (any standard Triton client): input ``FRAME`` uint8 ``[H, W, 3]`` (batched: clients send
``[1, H, W, 3]``), outputs ``MASK`` uint8 ``[H, W]`` and ``LOGITS`` float32 ``[C, H, W]`` (computed only
when requested). The sequence batcher (``oldest`` strategy, batches of up to the number of streams) sends
START/END/READY and the correlation id as control inputs: START restarts a sequence's memory, END frees its
stream, and an idle sequence's stream is reclaimed once Triton has timed it out. Triton gets more candidate
sequences than the model has streams, and the model refuses a START beyond its streams ("server full"): see
:mod:`tmanet.runtime.sequence_slots` for why Triton's own backlog is avoided.
"""
from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

from tmanet.errors import UserError
from tmanet.safe_files import atomic_directory
from tmanet.manifest import load_manifest

from .backends import BackendUnavailable, get_backend

MODEL_FILE = Path(__file__).with_name("triton_model.py")
SEQUENCE_ID_TYPES = ("uint64", "string")
# Cameras of one rate send their frames within a few ms of each other: waiting that long for them makes one
# engine batch of what would otherwise be a batch of one followed by a batch of the rest.
DEFAULT_QUEUE_DELAY_US = 5000


def candidate_sequences(max_sequences: int) -> int:
    """Triton's candidate slots per instance: room for the running sequences and for STARTs the model refuses
    (each holds a slot until Triton's idle timeout), so that Triton's backlog, which drops a sequence that waited
    in it longer than the idle timeout, is reached only by a flood of more than this many sequences."""
    return max(64, 8 * max_sequences)


# Set by `tmanet serve` for the model's Python stub: the folder holding tmanet (and torch, numpy) on this machine.
SITE_PACKAGES_ENV = "TMANET_SITE_PACKAGES"


def default_site_packages() -> str:
    """Where this interpreter's packages are: the Triton Python stub runs the system libpython and adds this
    folder itself (it ignores PYTHONPATH). Empty outside a virtualenv (e.g. a container with tmanet installed)."""
    return sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else ""


def config_pbtxt(name: str, spec, max_sequences: int, idle_timeout_ms: int, instances: int,
                 parameters: dict, sequence_id_type: str = "uint64", device: str = "cpu",
                 queue_delay_us: int = 0) -> str:
    H, W = spec.input_size
    C = spec.num_classes
    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    params = "\n".join(f'  {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }},'
                       for k, v in parameters.items()).rstrip(",")

    # The Python backend of Triton 2.51 refuses a string CORRID control tensor ("unexpected number of string
    # elements 2 for inference input 'CORRID'"); the model reads request.correlation_id() either way.
    corrid = ("" if sequence_id_type == "string" else
              ',\n    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }')

    def flag(name, kind_):
        return (f'    {{ name: "{name}" control [ {{ kind: {kind_} int32_false_true: [ 0, 1 ] }} ] }}')

    return f"""name: "{name}"
backend: "python"
max_batch_size: {max_sequences}
input [ {{ name: "FRAME" data_type: TYPE_UINT8 dims: [ {H}, {W}, 3 ] }} ]
output [
  {{ name: "MASK" data_type: TYPE_UINT8 dims: [ {H}, {W} ] }},
  {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ {C}, {H}, {W} ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: {int(idle_timeout_ms) * 1000}
  control_input [
{flag("START", "CONTROL_SEQUENCE_START")},
{flag("END", "CONTROL_SEQUENCE_END")},
{flag("READY", "CONTROL_SEQUENCE_READY")}{corrid}
  ]
  oldest {{ max_candidate_sequences: {candidate_sequences(max_sequences)} preferred_batch_size: [ {max_sequences} ]
           max_queue_delay_microseconds: {int(queue_delay_us)} }}
}}
instance_group [ {{ count: {instances} kind: {kind} }} ]
parameters [
{params}
]
"""


def _copy_export(export_dir: Path, dest: Path, spec, backend: str):
    """The export's top-level files (graphs, manifest, engines and their metadata), and what the backend needs
    beyond them (the torch backend: its checkpoint)."""
    dest.mkdir(parents=True)
    for f in sorted(export_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    get_backend(backend).copy_for_serving(export_dir, dest, spec)


def write_triton_repo(export_dir, out, model_name: str = "tmanet", backend: str = "ort", device: str = "cpu",
                      max_sequences: int = 4, idle_timeout_ms: int = 5000, instances: int = 1,
                      threads: int | None = None, sequence_id_type: str = "uint64",
                      site_packages: str | None = None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      backend_options: dict | None = None) -> Path:
    """Write model ``model_name`` into the repository ``out`` (created if needed; other models in it are left
    alone, an existing model of that name is an error). Returns the model folder. ``queue_delay_us``: how long
    the batcher may hold a request for the other sequences' frames to join its batch. ``backend_options``: the
    backend's own options (as ``tmanet run`` takes them), given to every model instance."""
    export_dir, out = Path(export_dir), Path(out)
    for what, value in (("--max-sequences", max_sequences), ("--idle-timeout-ms", idle_timeout_ms),
                        ("--instances", instances)):
        if not (isinstance(value, int) and value > 0):
            raise UserError(f"{what} must be a positive integer, got {value!r}")
    if not (isinstance(queue_delay_us, int) and queue_delay_us >= 0):
        raise UserError(f"--max-queue-delay-us must be a non-negative integer, got {queue_delay_us!r}")
    options = dict(backend_options or {}, **({"threads": threads} if threads else {}))
    try:
        backend_class = get_backend(backend)
    except (ValueError, BackendUnavailable) as e:
        raise UserError(str(e)) from None
    taken = {opt.key for opt in backend_class.options}
    if set(options) - taken:
        raise UserError(f"the {backend} backend takes no {', '.join(sorted(set(options) - taken))} option "
                        f"(it takes: {', '.join(sorted(taken)) or 'none'})")
    if sequence_id_type not in SEQUENCE_ID_TYPES:
        raise UserError(f"--sequence-id-type must be one of {SEQUENCE_ID_TYPES}, got {sequence_id_type!r}")
    if not model_name or not all(c.isalnum() or c in "_-" for c in model_name):
        raise UserError(f"--model-name must be letters, digits, '_' or '-', got {model_name!r}")
    spec = load_manifest(export_dir)  # refuse a damaged export before writing anything
    final = out / model_name
    if final.exists():
        raise UserError(f"{final} exists: choose another --model-name or --out (nothing was changed)")
    if export_dir.resolve() in (out.resolve(), *out.resolve().parents):
        raise UserError(f"--out {out} must not be inside the export directory {export_dir}")
    with atomic_directory(final) as tmp:  # built under a temporary name, renamed into place when complete
        _copy_export(export_dir, tmp / "1" / "export", spec, backend)
        shutil.copy2(MODEL_FILE, tmp / "1" / "model.py")
        parameters = {"backend": backend, "device": device, "options": json.dumps(options, sort_keys=True),
                      "site_packages": site_packages or ""}  # none by default: the repository can move
        (tmp / "config.pbtxt").write_text(config_pbtxt(model_name, spec, max_sequences, idle_timeout_ms,
                                                       instances, parameters, sequence_id_type, device,
                                                       queue_delay_us))
    return final
