"""Training TMANet with the paper's recipe (ICIP 2021, section 3.1), on one process or many (``torchrun``).

Recipe: SGD (momentum 0.9, weight decay 5e-4), lr 0.01 with the poly policy (power 0.9, min lr 1e-4, as
mmseg), batch 8, 80k iterations, random resize 0.5-2 + random crop + horizontal flip, cross-entropy with
ignore index 255 plus the auxiliary FCN loss on layer3 (weight 0.4), SyncBN across GPUs.

Reproducibility and resuming: a training sample is a pure function of (seed, epoch, index) (the datasets
draw their augmentation from ``default_rng([seed, epoch, index])``), the data order of each epoch is the
DistributedSampler permutation of (seed, epoch), and the torch RNG (dropout) is re-seeded from
(seed, iteration, rank) every iteration. So iteration k always sees the same batch and the same dropout
masks, and ``resume`` from ``latest.pth`` (model, optimizer, iteration) continues exactly where an
uninterrupted run would be (bitwise on the CPU with ``workers=0``; GPU kernels may be non-deterministic).

Checkpoints are our native format (:func:`tmanet.checkpoints.save_checkpoint`) with the optimizer state and
the iteration as extra entries; everything in them is tensors and plain containers, so
``tmanet.load_model`` reads them with ``weights_only=True`` and no preset.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tmanet.checkpoints import config_from_checkpoint, load_state, read_checkpoint, save_checkpoint, split_state_dict
from tmanet.model import TMANet
from tmanet.model.resnet import BasicBlock, Bottleneck
from tmanet.presets import ModelConfig, get_preset

log = logging.getLogger("tmanet")

IGNORE_INDEX = 255
LATEST, FINAL = "latest.pth", "final.pth"
MODEL = "model.pth"  # the deployable weights: no auxiliary head, no optimizer state (under half of final.pth)
LOG_CSV, LOG_JSON = "log.csv", "log.json"
CSV_FIELDS = ("iter", "loss", "decode_loss", "aux_loss", "lr", "time", "data_time", "elapsed")
SYNTHETIC_VAL_SEED = 1_000_000  # synthetic validation clips use seeds disjoint from the training clips
# Which frames fill the memory slots. "oldest_first" is the official rule (slot i = frame t-T+i);
# "newest_first" reverses it (slot i = frame t-1-i); "current" puts the current frame t in every slot: the
# same network and compute with no temporal information (the single-frame baseline of an ablation).
MEMORY_ORDERS = ("oldest_first", "newest_first", "current")


class InputError(ValueError):
    """Bad training/evaluation input (data, configuration, output folder): the message says what to fix."""


# -- recipe pieces -------------------------------------------------------------------------------------
def poly_lr(iteration: int, max_iters: int, base_lr: float, power: float = 0.9, min_lr: float = 1e-4) -> float:
    """mmcv's poly policy: ``(base - min) * (1 - iter / max_iters) ** power + min``, ``iter`` counted from 0.
    A base lr below ``min_lr`` stays constant (the floor never raises it)."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    min_lr = min(min_lr, base_lr)
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy with ignore index 255, averaged over *all* pixels as mmseg 0.x does (ignored
    pixels count as zero loss), so a batch that is entirely ignored gives 0, not NaN."""
    return F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none").mean()


def init_from_scratch(model: TMANet) -> TMANet:
    """mmseg's initialisation for training without pretrained weights: Kaiming-normal (fan_out) convs, BN
    weight 1 / bias 0, the last BN of every residual block zeroed (each block starts as the identity, which
    lets a deep net train from scratch), and the classifiers ``conv_seg`` normal(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.backbone.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    heads = [model.decode_head] + ([model.auxiliary_head] if model.auxiliary_head is not None else [])
    for head in heads:
        nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(head.conv_seg.bias)
    return model


def check_memory_order(order) -> str:
    """The canonical name of a memory order ("newest-first" is accepted for "newest_first")."""
    name = str(order).replace("-", "_")
    if name not in MEMORY_ORDERS:
        raise InputError(f"memory order must be one of {', '.join(MEMORY_ORDERS)}, got {order!r}")
    return name


def memory_frame_order(t: int, sequence_num: int, order: str = "oldest_first", start: int = 0) -> list[int]:
    """The frame each memory slot 0..T-1 reads for frame ``t`` of a clip that begins at ``start``, under
    ``order``; indices before ``start`` clamp to it (the warm-up rule)."""
    from tmanet.runtime.slots import memory_frame_indices  # the runtime's rule: training must match it
    order = check_memory_order(order)
    oldest_first = memory_frame_indices(t, start, sequence_num)
    if order == "current":
        return [t] * sequence_num
    return oldest_first[::-1] if order == "newest_first" else oldest_first


def order_memory(image, memory, order: str = "oldest_first"):
    """Re-order a sample's memory given oldest first (``[T, ...]`` frames t-T..t-1, what the datasets
    yield) to ``order``: reversed for "newest_first", T copies of ``image`` for "current". numpy arrays or
    torch tensors; "oldest_first" returns ``memory`` itself."""
    order = check_memory_order(order)
    if order == "oldest_first":
        return memory
    if order == "newest_first":
        return memory.flip(0) if isinstance(memory, torch.Tensor) else np.ascontiguousarray(memory[::-1])
    if isinstance(image, torch.Tensor):
        return image.unsqueeze(0).expand(memory.shape[0], *image.shape).clone()
    return np.repeat(np.asarray(image)[None], len(memory), axis=0)


# -- configuration -------------------------------------------------------------------------------------
def _default_names(n: int) -> tuple:
    return tuple(f"class_{i}" for i in range(n))


def _default_palette(n: int) -> tuple:
    rng = np.random.default_rng(12345)
    return tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n))


def parse_overrides(items) -> dict:
    """``["key=value", ...]`` -> dict; values are JSON (``16``, ``true``, ``[769,769]``) or plain strings."""
    out = {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"config override {item!r} is not key=value")
        if key not in fields:
            raise InputError(f"unknown config field {key!r} in override {item!r}; fields: {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_config(preset_or_config, overrides=None) -> tuple[ModelConfig, str | None]:
    """(config, preset name or None) from a preset name or a ModelConfig plus ``key=value`` overrides (a dict
    or a list of strings). Changing ``num_classes`` without names/palette fills in generic ones."""
    if isinstance(preset_or_config, ModelConfig):
        cfg, name = preset_or_config, None
    else:
        try:
            cfg, name = get_preset(str(preset_or_config)), str(preset_or_config)
        except ValueError as e:
            raise InputError(str(e)) from None
    changes = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if not changes:
        return cfg, name
    changes = dict(changes)
    n = changes.get("num_classes", cfg.num_classes)
    if n != cfg.num_classes:
        changes.setdefault("class_names", _default_names(n))
        changes.setdefault("palette", _default_palette(n))
    try:
        d = cfg.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d), name
    except (TypeError, ValueError) as e:
        raise InputError(f"bad config override {changes}: {e}") from None


def parse_pair(value, what="size") -> tuple[int, int] | None:
    """``"H,W"``, ``"N"``, an int or a pair -> (H, W)."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, int):
            parts = [value]
        else:
            parts = [int(p) for p in value]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"{what} must be H,W (or one number) with positive integers, got {value!r}") from None
    return parts[0], parts[1]


# -- data ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    kind: str                  # "synthetic" | "cityscapes" | "camvid"
    root: Path | None = None
    count: int | None = None   # synthetic clips


def parse_data(data) -> DataSpec:
    """``synthetic`` / ``synthetic:N``, or a folder in the Cityscapes video layout (``leftImg8bit_sequence``
    + ``gtFine``) or a CamVid layout (official TMANet: ``images`` + ``labels`` + ``annotations``; SegNet:
    ``train`` + ``trainannot`` ...)."""
    text = str(data)
    if text == "synthetic" or text.startswith("synthetic:"):
        count = None
        if ":" in text:
            try:
                count = int(text.split(":", 1)[1])
            except ValueError:
                count = 0
            if count <= 0:
                raise InputError(f"--data {text!r}: the clip count after 'synthetic:' must be a positive integer")
        return DataSpec("synthetic", count=count)
    root = Path(text)
    if not root.is_dir():
        raise InputError(f"--data {text!r} is neither 'synthetic[:N]' nor an existing folder")
    if (root / "gtFine").is_dir() and ((root / "leftImg8bit_sequence").is_dir() or (root / "leftImg8bit").is_dir()):
        return DataSpec("cityscapes", root=root)
    if all((root / d).is_dir() for d in ("images", "labels", "annotations")) or \
            any((root / s).is_dir() and (root / f"{s}annot").is_dir() for s in ("train", "val", "test")):
        return DataSpec("camvid", root=root)
    raise InputError(f"{root} has neither the Cityscapes video layout (leftImg8bit_sequence/ and gtFine/) nor a "
                     f"CamVid layout (official: images/ + labels/ + annotations/{{split}}.txt; SegNet: train/ + "
                     f"trainannot/, val/ + valannot/ ...)")


class SyntheticVideo:
    """Training samples (or whole clips for evaluation) from procedural street clips
    (:mod:`tmanet.training.synthetic`): target frame t, memory t-T..t-1 (oldest first) for t >= T, labels in
    Cityscapes trainIds. The clips are rendered once, deterministically: clip i of split "train" uses seed i,
    of split "val" seed 1,000,000 + i, so the two never overlap; ``damage[i]`` marks where clip i's frames were
    destroyed (:func:`~tmanet.training.synthetic.make_clip_with_damage`). Targets are frames ``first_target``
    (default T) to the end; a common ``first_target`` gives models of different T the same targets."""

    def __init__(self, count: int, sequence_num: int, size=(256, 512), frames: int = 12, split: str = "train",
                 degradation: float = 0.5, transform=None, seed: int = 0, progress: bool = False,
                 first_target: int | None = None):
        from tqdm import tqdm

        from .synthetic import ClipSpec, make_clip_with_damage
        if frames <= sequence_num:
            raise InputError(f"synthetic clips need more than T={sequence_num} frames, got {frames}")
        first = sequence_num if first_target is None else int(first_target)
        if not sequence_num <= first < frames:
            raise InputError(f"the first synthetic target frame must lie in T={sequence_num}..{frames - 1} "
                             f"(a full memory, inside the {frames}-frame clip), got {first_target}")
        self.sequence_num = int(sequence_num)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        base = 0 if split == "train" else SYNTHETIC_VAL_SEED
        h, w = size
        specs = [ClipSpec(frames=frames, height=h, width=w, degradation=degradation, seed=base + i)
                 for i in range(count)]
        rendered = [make_clip_with_damage(s) for s in tqdm(specs, desc=f"rendering synthetic {split} clips",
                                                           unit="clip", disable=not progress, leave=False)]
        self.clips = [r[:2] for r in rendered]
        self.damage = [r[2] for r in rendered]  # per clip: where each frame was destroyed
        self.samples = [(c, t) for c in range(count) for t in range(first, frames)]

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        c, t = self.samples[index]
        frames, labels = self.clips[c]
        image, memory, label = frames[t], frames[t - self.sequence_num:t], labels[t]
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            image, memory, label = self.transform(image, memory, label, rng=rng)
        return dict(image=image, memory=memory, label=label)


def open_dataset(data, config: ModelConfig, split: str = "train", transform=None, seed: int = 0,
                 synthetic_size=(256, 512), synthetic_frames: int = 12, default_count: int = 16,
                 frames_dir=None, progress: bool = False, synthetic_degradation: float = 0.5,
                 synthetic_first_target: int | None = None):
    """The dataset behind ``--data`` for ``split``: samples ``dict(image (H,W,3), memory (T,H,W,3) oldest first,
    label (H,W))``, uint8. Problems with the data become :class:`InputError`."""
    spec = data if isinstance(data, DataSpec) else parse_data(data)
    T = config.sequence_num
    try:
        if spec.kind == "synthetic":
            from .synthetic import SYNTHETIC_CLASSES
            top = max(SYNTHETIC_CLASSES)
            if config.num_classes <= top:
                raise InputError(f"synthetic labels are Cityscapes trainIds (up to {top}), but the model has "
                                 f"{config.num_classes} classes: use a Cityscapes preset")
            return SyntheticVideo(spec.count or default_count, T, synthetic_size, synthetic_frames, split,
                                  degradation=synthetic_degradation, transform=transform, seed=seed,
                                  progress=progress, first_target=synthetic_first_target)
        from .datasets import CamVidVideo, CityscapesVideo
        if spec.kind == "cityscapes":
            return CityscapesVideo(spec.root, split, sequence_num=T, transform=transform, seed=seed)
        return CamVidVideo(spec.root, split, sequence_num=T, frames_dir=frames_dir, transform=transform, seed=seed)
    except InputError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--data {data}: {e}") from None


class TrainSamples(torch.utils.data.Dataset):
    """Dataset samples as tensors for the training step: ``image`` uint8 [H,W,3], ``memory`` uint8
    [T,H,W,3], ``label`` int64 [H,W]. Items are addressed by ``(epoch, index)`` (what
    :class:`EpochSampler` yields) so that a sample depends only on the seed, the epoch and the index.

    Frames stay uint8 until they reach the device, where :meth:`TMANet.normalize` (the model's own mean/std)
    turns them into float: a quarter of the host-to-device traffic of float32 input. ``memory_order``
    re-orders the dataset's oldest-first memory (:func:`order_memory`).
    """

    def __init__(self, dataset, num_classes: int, memory_order: str = "oldest_first"):
        self.dataset = dataset
        self.num_classes = num_classes
        self.memory_order = check_memory_order(memory_order)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        self.dataset.set_epoch(epoch)
        s = self.dataset[index]
        label = np.asarray(s["label"])
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            where = s.get("label_path", f"sample {index}")
            raise ValueError(f"{where}: label values {np.unique(label[bad])[:8].tolist()} are not class ids "
                             f"0..{self.num_classes - 1} (nor the ignore index {IGNORE_INDEX})")
        memory = order_memory(np.asarray(s["image"]), np.asarray(s["memory"]), self.memory_order)
        return {"image": torch.from_numpy(np.ascontiguousarray(s["image"])),
                "memory": torch.from_numpy(np.ascontiguousarray(memory)),
                "label": torch.from_numpy(label.astype(np.int64))}


class EpochSampler(torch.utils.data.Sampler):
    """An endless stream of ``(epoch, index)``: epoch after epoch of the DistributedSampler permutation
    (seeded by seed + epoch, this rank's share), starting at sample ``start`` of this rank's stream, so
    that a resumed run sees exactly the batches the uninterrupted one would have."""

    def __init__(self, dataset, world_size: int, rank: int, seed: int, start: int = 0):
        from torch.utils.data.distributed import DistributedSampler
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=False)
        self.start = start

    def __iter__(self):
        per_epoch = len(self.inner)
        epoch, skip = divmod(self.start, per_epoch)
        while True:
            self.inner.set_epoch(epoch)
            for i, index in enumerate(self.inner):
                if i >= skip:
                    yield epoch, index
            epoch, skip = epoch + 1, 0


# -- distributed ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1): nccl on CUDA, gloo on
    the CPU. One process: nothing to join."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo", init_method="env://")
        created = True
    return Dist(world, rank, local_rank, created)


def _all_mean(values: list[float], d: Dist, device) -> list[float]:
    if d.world_size == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world_size).tolist()


# -- checkpoints ---------------------------------------------------------------------------------------
def init_weights(model: TMANet, path) -> list[str]:
    """Load weights from any checkpoint ``load_model`` reads (official, bare, native) into the training
    model; the auxiliary head keeps its fresh weights when the file has none. Returns notes."""
    sd, native, _ = split_state_dict(read_checkpoint(path))
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    config_from_checkpoint(sd, model.config, None)  # names every architecture disagreement
    has_aux = any(k.startswith("auxiliary_head.") for k in sd)
    aux = model.auxiliary_head
    if aux is not None and not has_aux:
        model.auxiliary_head = None  # compare against the model without it, then put it back
        try:
            load_state(model, sd, source=str(path))
        finally:
            model.auxiliary_head = aux
        return [f"{path} has no auxiliary head: it starts from scratch"]
    load_state(model, sd, source=str(path))
    return []


def save_model(model: TMANet, path, meta: dict | None = None):
    """Inference-only native checkpoint of a training model: the auxiliary head and the BN batch counters
    are dropped (``load_model`` skips them anyway) and no optimizer state is kept."""
    clean = TMANet(model.config, with_aux=False)
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith("auxiliary_head.") and not k.endswith("num_batches_tracked")}
    clean.load_state_dict(sd, strict=False)  # only the counters are absent; shapes and names are the model's
    missing = [k for k in clean.state_dict() if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"inference weights incomplete: {missing[:5]}")
    save_checkpoint(clean, path, meta=_plain(meta or {}))


def _unwrap(model) -> TMANet:
    return model.module if hasattr(model, "module") else model


def _plain(v):
    """JSON-like plain Python (what ``torch.load(weights_only=True)`` accepts)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


# -- training ------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float
    decode_loss: float
    aux_loss: float


class Trainer:
    """One optimisation step of the recipe on a batch (``image``/``memory`` uint8 HWC, ``label`` int64)."""

    def __init__(self, model, optimizer, device, aux_weight: float = 0.4, amp: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.aux_weight = aux_weight
        self.amp = amp

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        core = _unwrap(self.model)
        dev = self.device
        image = core.normalize(batch["image"].to(dev, non_blocking=True))
        memory = core.normalize(batch["memory"].to(dev, non_blocking=True))
        label = batch["label"].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(image, memory)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        decode = segmentation_loss(logits.float(), label)
        aux_loss = segmentation_loss(aux.float(), label) if aux is not None else torch.zeros((), device=dev)
        return decode + self.aux_weight * aux_loss, decode, aux_loss

    def step(self, batch, lr: float | None = None) -> StepResult:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        loss, decode, aux = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepResult(float(loss.detach()), float(decode.detach()), float(aux.detach()))


def make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4) -> torch.optim.SGD:
    # mmseg's default: one group, weight decay on every parameter (BN included).
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank, 0x7A1]).generate_state(1)[0])


def _pick_device(device, d_local_rank: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", d_local_rank)
    return dev


def _check_resume_args(meta: dict, **given):
    """Warn about arguments that differ from the run being resumed: the result is then no longer what the
    uninterrupted run would have given (sometimes intended, e.g. a new learning rate)."""
    for key, value in given.items():
        if value is None or key not in meta:
            continue
        was = meta[key]
        if key == "crop":
            value = list(parse_pair(value, "crop"))
        if was != value:
            log.warning("resuming with %s=%s, but the run was started with %s=%s", key, value, key, was)


def _truncate_csv(path: Path, last_iter: int):
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(r for r in rows if r.get("iter") and int(r["iter"]) <= last_iter)


def train(preset_or_config=None, data="synthetic", out_dir="runs/train", iters: int = 80000,
          batch: int = 8, lr: float = 0.01, resume: bool = False, crop=None, workers: int = 2, seed: int = 0,
          overrides=None, init=None, device=None, momentum: float = 0.9, weight_decay: float = 5e-4,
          power: float = 0.9, min_lr: float = 1e-4, aux_weight: float = 0.4, ratio_range=(0.5, 2.0),
          log_every: int = 10, checkpoint_every: int = 1000, keep_every: int | None = 8000,
          stop_after: int | None = None, synthetic_size=(256, 512), synthetic_frames: int = 12,
          frames_dir=None, amp: bool = False, progress: bool = True, memory_order: str | None = None,
          synthetic_degradation: float | None = None, synthetic_first_target: int | None = None) -> dict:
    """Train TMANet (with the auxiliary head) and write ``out_dir``: ``latest.pth`` (every
    ``checkpoint_every`` iterations and at the end), ``iter_{k}.pth`` (every ``keep_every``), ``final.pth``
    (with optimizer and auxiliary head, to resume or fine-tune), ``model.pth`` (inference weights only),
    ``log.csv`` (one row per ``log_every`` iterations) and ``log.json`` (the run's summary).

    ``batch`` is the global batch, split over the torchrun processes. ``crop`` defaults to the preset's
    slide window (the paper's training crop), clipped to the synthetic clip size for synthetic data.
    ``resume`` continues from ``out_dir/latest.pth`` (its config wins; ``iters`` may be raised); a folder
    that already holds a run is refused without it. ``stop_after`` ends this invocation after that many
    iterations (a time-sliced job), leaving ``latest.pth`` to resume from. ``init`` starts from the weights
    of a checkpoint instead of the from-scratch initialisation. ``memory_order`` (default "oldest_first",
    the official rule; a resumed run keeps its own) picks the frames the memory slots see
    (:data:`MEMORY_ORDERS`). ``synthetic_degradation`` (default 0.5) and ``synthetic_first_target``
    (default T) shape synthetic training clips. Returns the summary written to log.json.
    """
    if iters <= 0 or batch <= 0:
        raise InputError(f"iters and batch must be positive, got iters={iters} batch={batch}")
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    if stop_after is not None and stop_after <= 0:
        raise InputError(f"stop_after must be positive, got {stop_after}")
    if memory_order is not None:
        memory_order = check_memory_order(memory_order)
    if synthetic_degradation is not None and not 0.0 <= float(synthetic_degradation) <= 1.0:
        raise InputError(f"synthetic degradation must lie in [0, 1], got {synthetic_degradation}")
    out = Path(out_dir)
    latest = out / LATEST
    spec = parse_data(data)
    synthetic_size = parse_pair(synthetic_size, "synthetic size")

    # Resolve the configuration first (cheap), so that bad input fails before anything is written.
    ckpt = None
    if resume:
        if not latest.is_file():
            raise InputError(f"--resume: {latest} does not exist (nothing to resume; drop --resume to start)")
        ckpt = read_checkpoint(latest)
        if "optimizer" not in ckpt or "iter" not in ckpt:
            raise InputError(f"{latest} is not a training checkpoint (no optimizer state / iteration)")
        config = ModelConfig.from_dict(ckpt["config"])
        preset = ckpt.get("meta", {}).get("preset")
        if preset_or_config is not None or overrides:
            wanted, _ = resolve_config(preset_or_config if preset_or_config is not None else config, overrides)
            if wanted != config:
                diff = [k for k in wanted.to_dict() if wanted.to_dict()[k] != config.to_dict()[k]]
                raise InputError(f"--resume: {latest} was trained with another config (differs in {diff}); "
                                 "drop --preset/--config-override or use another --out")
    else:
        if preset_or_config is None:
            raise InputError("a preset (or config) is needed to start training")
        if latest.is_file():
            raise InputError(f"{out} already holds a training run ({LATEST}): pass --resume to continue it or "
                             "choose another --out")
        config, preset = resolve_config(preset_or_config, overrides)
    if ckpt is not None:
        run_meta = ckpt.get("meta", {})
        _check_resume_args(run_meta, crop=crop, data=str(data), batch=batch, lr=lr, seed=seed,
                           synthetic_size=list(synthetic_size), synthetic_frames=synthetic_frames,
                           memory_order=memory_order, synthetic_degradation=synthetic_degradation,
                           synthetic_first_target=synthetic_first_target)
        if crop is None and run_meta.get("crop"):
            crop = run_meta["crop"]  # the run's own crop, not the preset default
        # The run's own memory order and synthetic data, unless given (runs from before these options: defaults).
        memory_order = memory_order or run_meta.get("memory_order")
        if synthetic_degradation is None:
            synthetic_degradation = run_meta.get("synthetic_degradation")
        if synthetic_first_target is None:
            synthetic_first_target = run_meta.get("synthetic_first_target")
    memory_order = memory_order or "oldest_first"
    synthetic_degradation = 0.5 if synthetic_degradation is None else float(synthetic_degradation)
    if crop is None:
        crop = config.slide_crop
        if spec.kind == "synthetic":
            crop = tuple(min(c, s) for c, s in zip(crop, synthetic_size))
    crop = parse_pair(crop, "crop")

    dev_req = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    dist_state = setup_distributed(torch.device(dev_req).type)
    try:
        return _train(config, preset, spec, data, out, iters, batch, lr, ckpt, crop, workers, seed, init,
                      _pick_device(device, dist_state.local_rank), dist_state, momentum, weight_decay, power,
                      min_lr, aux_weight, ratio_range, log_every, checkpoint_every, keep_every, stop_after,
                      synthetic_size, synthetic_frames, frames_dir, amp, progress, memory_order,
                      synthetic_degradation, synthetic_first_target)
    finally:
        if dist_state.initialized_here:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config, preset, spec, data, out, iters, batch, lr, ckpt, crop, workers, seed, init, device, d,
           momentum, weight_decay, power, min_lr, aux_weight, ratio_range, log_every, checkpoint_every,
           keep_every, stop_after, synthetic_size, synthetic_frames, frames_dir, amp, progress, memory_order,
           synthetic_degradation, synthetic_first_target) -> dict:
    from tqdm import tqdm

    from .datasets import TrainTransform
    if batch % d.world_size:
        raise InputError(f"the batch ({batch}) must be a multiple of the number of processes ({d.world_size})")
    if amp and device.type != "cuda":
        raise InputError("--amp (bfloat16 autocast) is for CUDA devices")
    per_rank = batch // d.world_size

    transform = TrainTransform(crop, ratio_range=ratio_range, flip_prob=0.5, seed=seed)
    dataset = open_dataset(spec, config, "train", transform, seed, synthetic_size, synthetic_frames,
                           frames_dir=frames_dir, progress=progress and d.main,
                           synthetic_degradation=synthetic_degradation, synthetic_first_target=synthetic_first_target)
    samples = TrainSamples(dataset, config.num_classes, memory_order)

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = init_from_scratch(TMANet(config, with_aux=True))
    notes = init_weights(model, init) if init and ckpt is None else []
    for note in notes:
        log.info(note)
    start = 0
    if ckpt is not None:
        try:  # the same architecture wrote it: load everything, BN counters included
            model.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as e:
            raise InputError(f"{out / LATEST} does not fit its own config: {e}") from None
        start = int(ckpt["iter"])
    model.to(device)
    if d.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, lr, momentum, weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if d.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trainer = Trainer(model, optimizer, device, aux_weight, amp)

    end = iters if stop_after is None else min(iters, start + stop_after)
    loader = torch.utils.data.DataLoader(
        samples, batch_size=per_rank, sampler=EpochSampler(samples, d.world_size, d.rank, seed, start * per_rank),
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False, prefetch_factor=2 if workers else None)

    meta = {"preset": preset, "data": str(data), "iters": iters, "batch": batch, "lr": lr, "crop": list(crop),
            "seed": seed, "momentum": momentum, "weight_decay": weight_decay, "power": power, "min_lr": min_lr,
            "aux_weight": aux_weight, "ratio_range": list(ratio_range), "world_size": d.world_size,
            "synthetic_size": list(synthetic_size), "synthetic_frames": synthetic_frames,
            "memory_order": memory_order}
    if spec.kind == "synthetic":
        meta.update(synthetic_degradation=synthetic_degradation, synthetic_first_target=synthetic_first_target)

    def save(path: Path, it: int):
        save_checkpoint(_unwrap(model), path, meta=_plain({**meta, "iter": it, "saved": time.time()}),
                        extra={"optimizer": optimizer.state_dict(), "iter": it})

    csv_file = writer = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            _truncate_csv(out / LOG_CSV, start)
        new = not (out / LOG_CSV).is_file()
        csv_file = open(out / LOG_CSV, "a", newline="")
        writer = csv.DictWriter(csv_file, CSV_FIELDS)
        if new:
            writer.writeheader()
        log.info("training %s on %s: %d samples, iterations %d..%d, batch %d (%d process(es)), crop %dx%d, "
                 "memory %s, %s", preset or "custom config", data, len(samples), start, end, batch, d.world_size,
                 *crop, memory_order, device)

    bar = tqdm(total=iters, initial=start, desc="train", unit="it", disable=not (progress and d.main),
               dynamic_ncols=True)
    started = time.perf_counter()
    step_times = []
    window = {"loss": [], "decode_loss": [], "aux_loss": [], "time": [], "data_time": []}
    last = None
    saved = []
    it = start
    try:
        data_iter = iter(loader)
        while it < end:
            t0 = time.perf_counter()
            batch_data = next(data_iter)
            t1 = time.perf_counter()
            torch.manual_seed(_iteration_seed(seed, it, d.rank))  # dropout masks are a function of the iteration
            cur_lr = poly_lr(it, iters, lr, power, min_lr)
            res = trainer.step(batch_data, cur_lr)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            if not math.isfinite(res.loss):
                raise RuntimeError(f"the loss became {res.loss} at iteration {it}: lower the learning rate")
            it += 1
            step_times.append(t2 - t0)
            for k, v in (("loss", res.loss), ("decode_loss", res.decode_loss), ("aux_loss", res.aux_loss),
                         ("time", t2 - t0), ("data_time", t1 - t0)):
                window[k].append(v)
            if it % log_every == 0 or it == end:
                means = _all_mean([float(np.mean(window[k])) for k in ("loss", "decode_loss", "aux_loss")],
                                  d, device if device.type == "cuda" else "cpu")
                last = dict(zip(("loss", "decode_loss", "aux_loss"), means))
                if d.main:
                    writer.writerow({"iter": it, **{k: f"{v:.6f}" for k, v in last.items()}, "lr": f"{cur_lr:.6g}",
                                     "time": f"{np.mean(window['time']):.4f}",
                                     "data_time": f"{np.mean(window['data_time']):.4f}",
                                     "elapsed": f"{time.perf_counter() - started:.1f}"})
                    csv_file.flush()
                window = {k: [] for k in window}
            if d.main:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{cur_lr:.2e}", refresh=False)
                if keep_every and it % keep_every == 0 and it < iters:
                    save(out / f"iter_{it}.pth", it)
                    saved.append(f"iter_{it}.pth")
                if it % checkpoint_every == 0 or it == end:
                    save(out / LATEST, it)
                    if it == iters:
                        save(out / FINAL, it)
                        save_model(_unwrap(model), out / MODEL, {**meta, "iter": it})
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
    elapsed = time.perf_counter() - started
    if d.main and start == end == iters and not (out / FINAL).is_file():
        save(out / FINAL, it)  # resumed a finished run whose final.pth went missing
        save_model(_unwrap(model), out / MODEL, {**meta, "iter": it})
    steady = step_times[min(5, len(step_times) // 2):]  # the first iterations pay for warm-up
    summary = {
        "preset": preset, "config": config.to_dict(), "data": str(data), "samples": len(samples),
        "device": str(device), "world_size": d.world_size, "batch": batch, "crop": list(crop), "iters": iters,
        "memory_order": memory_order, "start_iter": start, "end_iter": it, "finished": it >= iters,
        "seconds": round(elapsed, 3),
        "iters_per_second": (it - start) / elapsed if it > start and elapsed > 0 else None,
        "steady_iters_per_second": len(steady) / sum(steady) if steady else None,
        "last_log": last, "checkpoints": {"latest": LATEST, "final": FINAL if it >= iters else None,
                                          "model": MODEL if it >= iters else None,
                                          "periodic": saved},
        "recipe": {k: meta[k] for k in ("lr", "momentum", "weight_decay", "power", "min_lr", "aux_weight",
                                        "ratio_range", "seed")},
        "init": str(init) if init else None, "notes": notes,
    }
    if d.main:
        history = []
        if (out / LOG_JSON).is_file() and start > 0:
            try:
                prev = json.loads((out / LOG_JSON).read_text())
                history = prev.pop("history", []) + [prev]
            except (json.JSONDecodeError, AttributeError):
                history = []
        (out / LOG_JSON).write_text(json.dumps(_plain({**summary, "history": history}), indent=1) + "\n")
    return summary
