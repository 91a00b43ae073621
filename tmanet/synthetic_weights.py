"""Synthetic weights in the official TMANet checkpoint layout (the standard test clip: :mod:`tmanet.test_clips`).

Official checkpoints cannot ship with the toolkit, but their exact key layout can: ``tmanet/data`` holds the
``state_dict`` manifests of the two official configs (``key<TAB>shape<TAB>dtype`` per line, shape as
comma-separated ints, empty for a 0-d tensor). From a manifest and a seed this module builds a checkpoint
with the documented seeded fill rule, bit for bit the one the reference golden outputs were computed with
(``state_dict_sha256`` of cityscapes seed 0 is ``bb14f00d...a09915``), and the documented synthetic clip.

Fill rule: one ``torch.Generator().manual_seed(seed)``, consumed key by key in manifest order (CPU float32
draws): ``num_batches_tracked`` -> int64 0 (no draw); ``running_mean`` -> 0.1*randn; ``running_var`` ->
0.5+rand; 1-D ``weight`` -> 0.5+rand; 1-D ``bias`` -> 0.1*randn; 4-D ``weight`` (out, in, kh, kw) ->
randn * (sqrt(2/(in*kh*kw)) * gain), the two Python floats multiplied first; gain 0.3 for keys ending in
``.conv3.weight`` or containing ``_key_conv.`` (damps the residual branches and the un-scaled attention
logits so the synthetic model neither explodes nor has one-hot attention), 1.0 otherwise. Anything else is
an error.

Usage: ``python -m tmanet.synthetic_weights --manifest cityscapes --seed 0 --out ckpt.pth`` or
``python -m tmanet.synthetic_weights --make-clip --frames 5 --height 64 --width 128 --seed 100 --out c.npy``.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .safe_files import atomic_file
from tmanet.test_clips import make_noise_clip

DATA_DIR = Path(__file__).resolve().parent / "data"
# Manifest files shipped in tmanet/data, by dataset and by the preset they belong to.
MANIFEST_FILES = {
    "cityscapes": "tmanet_r50-d8_cityscapes_state_dict_manifest.tsv",
    "camvid": "tmanet_r50-d8_camvid_state_dict_manifest.tsv",
}
MANIFEST_ALIASES = {"cityscapes-r50": "cityscapes", "camvid-r50": "camvid"}

CHECKPOINT_NOTE = "synthetic weights in the official TMANet checkpoint layout"
DAMPED_GAIN = 0.3


def manifest_path(name_or_path) -> Path:
    """A shipped manifest by name (``cityscapes``, ``camvid``, or the presets ``cityscapes-r50``,
    ``camvid-r50``), or an existing manifest file."""
    name = os.fspath(name_or_path)
    key = MANIFEST_ALIASES.get(name, name)
    if key in MANIFEST_FILES:
        path = DATA_DIR / MANIFEST_FILES[key]
        if not path.is_file():
            raise FileNotFoundError(f"packaged manifest missing: {path} (broken installation?)")
        return path
    if os.path.isfile(name):
        return Path(name)
    known = ", ".join(sorted(MANIFEST_FILES) + sorted(MANIFEST_ALIASES))
    raise FileNotFoundError(f"no manifest {name!r}: not a file and not one of the shipped manifests ({known})")


def read_manifest(path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``[(key, shape, dtype), ...]`` in file order from a manifest TSV (a path or a shipped name)."""
    path = manifest_path(path)
    entries = []
    seen = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{lineno}: expected key<TAB>shape<TAB>dtype, got {line!r}")
            key, shape_text, dtype_name = fields
            try:
                shape = tuple(int(s) for s in shape_text.split(",")) if shape_text else ()
            except ValueError:
                raise ValueError(f"{path}:{lineno}: bad shape {shape_text!r}") from None
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{path}:{lineno}: unknown dtype {dtype_name!r}")
            if key in seen:
                raise ValueError(f"{path}:{lineno}: duplicate key {key!r}")
            seen.add(key)
            entries.append((key, shape, dtype))
    if not entries:
        raise ValueError(f"{path}: empty manifest")
    return entries


def conv_gain(key: str) -> float:
    """Extra factor on a He-scaled conv weight: residual-branch ends and attention key convs are damped."""
    return DAMPED_GAIN if key.endswith(".conv3.weight") or "_key_conv." in key else 1.0


def _fill(key, shape, g) -> torch.Tensor:
    # The expressions (and their operand order) are part of the rule: they fix the float32 rounding.
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.int64)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g, dtype=torch.float32)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if key.endswith("weight") and len(shape) == 1:
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if key.endswith("bias") and len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=g, dtype=torch.float32)
    if key.endswith("weight") and len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=g, dtype=torch.float32) * (math.sqrt(2.0 / fan_in) * conv_gain(key))
    raise ValueError(f"no fill rule for {key} with shape {shape}")


def official_layout_state_dict(manifest, seed: int) -> OrderedDict:
    """The manifest's keys, in order, with its shapes and dtypes, filled by the seeded rule.
    ``manifest``: a path, a shipped manifest name, or entries from :func:`read_manifest`."""
    entries = manifest if isinstance(manifest, list) else read_manifest(manifest)
    g = torch.Generator().manual_seed(int(seed))
    sd = OrderedDict()
    for key, shape, dtype in entries:
        t = _fill(key, tuple(shape), g)
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{key}: the fill rule makes {tuple(t.shape)} {t.dtype}, the manifest says "
                             f"{tuple(shape)} {dtype}")
        sd[key] = t
    return sd


def write_official_checkpoint(manifest, seed: int, out) -> Path:
    """Save ``{'meta': {...}, 'state_dict': sd}`` (the mmcv layout, no optimizer) to ``out``."""
    sd = official_layout_state_dict(manifest, seed)
    source = manifest if isinstance(manifest, list) else manifest_path(manifest).name
    meta = {"note": CHECKPOINT_NOTE, "seed": int(seed),
            "manifest": source if isinstance(source, str) else "entries"}
    out = Path(out)
    with atomic_file(out) as tmp:  # no half-written checkpoint under the final name
        torch.save({"meta": meta, "state_dict": sd}, tmp)
    return out


def state_dict_sha256(sd) -> str:
    """sha256 over, per key in order, the key's UTF-8 bytes then the tensor's C-order bytes."""
    h = hashlib.sha256()
    for key, t in sd.items():
        h.update(key.encode("utf-8"))
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tmanet.synthetic_weights",
                                description="Synthetic official-layout TMANet checkpoints and clips.")
    p.add_argument("--manifest", help=f"a manifest TSV or one of {sorted(MANIFEST_FILES)}")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--make-clip", action="store_true", help="write a synthetic clip (.npy) instead")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    a = p.parse_args(argv)
    try:
        if a.make_clip:
            if None in (a.frames, a.height, a.width):
                p.error("--make-clip needs --frames, --height and --width")
            clip = make_noise_clip(a.frames, a.height, a.width, a.seed)
            with atomic_file(a.out) as tmp, open(tmp, "wb") as f:
                np.save(f, clip)
            print(f"clip {clip.shape} uint8 -> {a.out}")
            return 0
        if not a.manifest:
            p.error("--manifest is required (or use --make-clip)")
        out = write_official_checkpoint(a.manifest, a.seed, a.out)
        print(f"official-layout checkpoint ({a.manifest}, seed {a.seed}) -> {out}")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
