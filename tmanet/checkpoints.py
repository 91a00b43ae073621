"""Loading and saving checkpoints: official mmcv files, bare state_dicts and our native format.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""
from __future__ import annotations

import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from collections import OrderedDict

import torch

from .model.tmanet import TMANet
from .presets import PRESETS, RESNET_STAGE_BLOCKS, ModelConfig, get_preset
from .safe_files import atomic_file

log = logging.getLogger("tmanet")

NATIVE_FORMAT = "tmanet-trt/1"
TRAINING_ONLY_PREFIXES = ("auxiliary_head.",)


class CheckpointError(ValueError):
    """The checkpoint cannot be used: the message says why, listing every problem."""


def read_checkpoint(path) -> dict:
    """The raw object in ``path``, loaded safely, with a clear error for unreadable or unsafe files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the error below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not allow: that is the unsafe case. Other unpickling
        # errors mean the bytes are not a checkpoint at all.
        lines = [line for line in str(e).splitlines() if "global" in line.lower()]
        if not lines and (imported := pickle_imports(path)):
            raise CheckpointError(
                f"refused to load {path}: it is a plain pickle that imports Python objects ({imported}), which "
                "could run code when unpickled; it was not run. Save the state_dict with torch.save") from None
        if not lines:
            raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch checkpoint") from None
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects beyond tensors and plain containers, which "
            f"could run code when unpickled (weights_only=True). Re-save only the state_dict. "
            f"({lines[0].strip()})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch checkpoint ({e})") from None


def pickle_imports(path, limit: int = 3) -> str:
    """The first ``limit`` ``module.name`` a plain pickle imports (scanned, never executed); '' if none or if
    the file is not a readable pickle."""
    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if len(found) >= limit:
                    break
    except Exception:  # not a pickle, or cut short: whatever was found so far stands
        pass
    return ", ".join(found)


def split_state_dict(obj) -> tuple[OrderedDict, dict | None, str]:
    """(state_dict, native config dict or None, format name) of a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    if obj.get("format") == NATIVE_FORMAT:
        return OrderedDict(obj["state_dict"]), obj["config"], "native"
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return OrderedDict(obj["state_dict"]), None, "mmcv"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return OrderedDict(obj), None, "state_dict"
    raise CheckpointError("not a TMANet checkpoint: expected an mmcv dict with 'state_dict', a bare "
                          f"state_dict or a {NATIVE_FORMAT} file; top-level keys: {sorted(obj)[:10]}")


def is_training_only(key: str) -> bool:
    return key.startswith(TRAINING_ONLY_PREFIXES) or key.endswith("num_batches_tracked")


def infer_shape_fields(sd) -> dict:
    """The config fields a state_dict's tensor shapes determine (those it lacks are left out)."""
    found = {}

    def shape(key):
        t = sd.get(key)
        return None if t is None else tuple(t.shape)

    blocks = []
    for i in range(1, 5):
        ids = {int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.layer{i}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    depths = [d for d, b in RESNET_STAGE_BLOCKS.items() if b == tuple(blocks) and (d >= 50) == bottleneck]
    if depths:
        found["depth"] = depths[0]
    if (s := shape("backbone.stem.6.weight")):
        found["base_channels"] = s[0]
    slots = {int(m.group(1)) for k in sd if (m := re.match(r"decode_head\.memory_key_conv\.0\.(\d+)\.", k))}
    if slots:
        found["memory_frames"] = max(slots) + 1
    if (s := shape("decode_head.query_key_conv.0.conv.weight")):
        found["key_channels"] = s[0]
    if (s := shape("decode_head.query_value_conv.0.conv.weight")):
        found["value_channels"] = s[0]
    if (s := shape("decode_head.conv_seg.weight")):
        found["num_classes"], found["channels"] = s[0], s[1]
    if (s := shape("decode_head.bottleneck.conv.weight")) and "value_channels" in found:
        found["aggregation"] = "concat" if s[1] == 2 * found["value_channels"] else "sum"
    if "decode_head.conv_seg.weight" in sd:
        found["place_read"] = "decode_head.place_proj.weight" in sd
    if (s := shape("auxiliary_head.convs.0.conv.weight")):
        found["aux_channels"] = s[0]
    return found


def _base_preset(fields) -> tuple[str, ModelConfig]:
    """The official preset a preset-less checkpoint most likely belongs to (for what shapes cannot say:
    align_corners, output stride, class names)."""
    for name in ("cityscapes-r50", "camvid-r50"):
        p = PRESETS[name]
        if fields.get("num_classes") == p.num_classes:
            return name, p
    return "cityscapes-r50", PRESETS["cityscapes-r50"]


def config_from_checkpoint(sd, preset: str | ModelConfig | None, native: dict | None) -> ModelConfig:
    fields = infer_shape_fields(sd)
    if preset is not None:
        cfg = get_preset(preset) if isinstance(preset, str) else preset
        name = preset if isinstance(preset, str) else "given config"
        wrong = [f"{k}: checkpoint {v}, preset {getattr(cfg, k)}" for k, v in fields.items()
                 if k != "aux_channels" and getattr(cfg, k) != v]
        if wrong:
            raise CheckpointError(f"checkpoint does not match {name!r}: " + "; ".join(wrong))
        return cfg
    if native is not None:
        return ModelConfig.from_dict(native)
    name, base = _base_preset(fields)
    changes = {k: v for k, v in fields.items() if getattr(base, k) != v}
    if "num_classes" in changes:
        n = changes["num_classes"]
        changes["class_names"] = tuple(f"class_{i}" for i in range(n))
        changes["palette"] = tuple(tuple(int(c) for c in torch.randint(0, 256, (3,), generator=torch.Generator()
                                                                     .manual_seed(i))) for i in range(n))
    log.info("no preset given: shapes say %s; align_corners, output stride and slide window from %r",
             fields, name)
    return base.replace(**changes)


def load_model(path, preset: str | ModelConfig | None = None, with_aux: bool = False) -> TMANet:
    """A TMANet in eval mode from an official mmcv checkpoint, a bare state_dict or a native checkpoint.

    Without a preset the architecture is inferred from the tensor shapes (a native checkpoint carries its
    config); with one, every disagreement is named. Missing, unexpected and mis-shaped keys are reported
    together in one error (when the shapes were inferred, against the preset the checkpoint fits best, so a
    missing key is named instead of blaming the keys an inference without it got wrong). Training-only
    entries (auxiliary head, ``num_batches_tracked``) are skipped with a note unless ``with_aux`` (training)
    keeps the auxiliary head. Weights that are NaN or infinite are refused.
    """
    sd, native, fmt = split_state_dict(read_checkpoint(path))
    sd = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())
    cfg = config_from_checkpoint(sd, preset, native)
    source = os.fspath(path)
    if preset is None and native is None:
        problems = state_problems(_expected_shapes(cfg, with_aux), sd)
        if problems:
            best = min(PRESETS.values(), key=lambda c: len(state_problems(_expected_shapes(c, with_aux), sd)))
            if len(state_problems(_expected_shapes(best, with_aux), sd)) < len(problems):
                cfg = best
    model = TMANet(cfg, with_aux=with_aux)
    load_state(model, sd, source=source)
    model.load_format = fmt
    return model.eval()


def _expected_shapes(cfg: ModelConfig, with_aux: bool) -> dict:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = TMANet(cfg, with_aux=with_aux)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def state_problems(expected: dict, sd) -> list[tuple[str, str]]:
    """(kind, description) of every key of ``sd`` that does not fit ``expected`` (key -> shape);
    training-only keys are not problems."""
    given = {k: v for k, v in sd.items() if not (k not in expected and is_training_only(k))}
    problems = [("missing keys", k) for k in expected if k not in given]
    problems += [("unexpected keys", k) for k in given if k not in expected]
    problems += [("mis-shaped keys", f"{k}: checkpoint {tuple(v.shape)}, model {expected[k]}")
                 for k, v in given.items() if k in expected and tuple(v.shape) != expected[k]]
    return problems


def first_non_finite(sd) -> str | None:
    """The first key of ``sd`` whose floating-point tensor holds a NaN or an infinity, with a count."""
    for key, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            return f"{key} ({bad} of {v.numel()} values are NaN or infinite)"
    return None


_SKIPS_REPORTED: set[str] = set()


def load_state(model: TMANet, sd, source="checkpoint"):
    """Strictly load ``sd`` into ``model``: every problem listed in one error; training-only skipped;
    non-finite weights refused."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    skipped = [k for k in sd if k not in expected and is_training_only(k)]
    given = {k: v for k, v in sd.items() if k not in skipped}
    found = state_problems(expected, given)
    problems = []
    for title in ("missing keys", "unexpected keys", "mis-shaped keys"):
        items = [d for kind, d in found if kind == title]
        if items:
            shown = "\n    ".join(items[:50]) + (f"\n    ... and {len(items) - 50} more" if len(items) > 50 else "")
            problems.append(f"  {len(items)} {title}:\n    {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model {describe(model.config)}:\n" + "\n".join(problems))
    if (bad := first_non_finite(given)) is not None:
        raise CheckpointError(f"{source}: non-finite weights in {bad}: the checkpoint is damaged (or its "
                              "training diverged); refusing to use it")
    model.load_state_dict(given, strict=False)
    if skipped and source not in _SKIPS_REPORTED:  # once per file and process: the demo loads one file twice
        _SKIPS_REPORTED.add(source)
        aux = sum(k.startswith(TRAINING_ONLY_PREFIXES) for k in skipped)
        log.info("  %s: skipped %d training-only entries (%d auxiliary head, %d num_batches_tracked)",
                 Path(source).name, len(skipped), aux, len(skipped) - aux)
    model.skipped_keys = skipped
    return model


def describe(cfg: ModelConfig) -> str:
    return (f"(ResNet-{cfg.depth} width {cfg.base_channels}, T={cfg.memory_frames}, Ck={cfg.key_channels}, "
            f"Cv={cfg.value_channels}, {cfg.num_classes} classes{', place read' if cfg.place_read else ''})")


def save_checkpoint(model: TMANet, path, meta: dict | None = None, extra: dict | None = None):
    """Our native format: the state_dict plus the full config, so ``load_model`` needs no preset."""
    obj = {"format": NATIVE_FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict(),
           "meta": meta or {}}
    obj.update(extra or {})
    with atomic_file(path) as tmp:  # never a half-written checkpoint under the final name
        torch.save(obj, tmp)
