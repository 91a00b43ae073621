"""The data side of training: ``--data`` parsed into a dataset (procedural synthetic clips, or the Cityscapes /
CamVid video layouts of :mod:`tmanet.training.datasets`), samples as tensors in the memory order of the run,
and the sampler that makes every batch a pure function of (seed, epoch, index), so a resumed run sees the
batches the uninterrupted one would have."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tmanet.metrics import IGNORE_INDEX
from tmanet.presets import ModelConfig

from .config import InputError, check_memory_order
from .recipe import order_memory

SYNTHETIC_VAL_SEED = 1_000_000  # synthetic validation clips use seeds disjoint from the training clips


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
    destroyed (:func:`~tmanet.training.synthetic.make_street_clip_with_damage`). Targets are frames ``first_target``
    (default T) to the end; a common ``first_target`` gives models of different T the same targets."""

    def __init__(self, count: int, memory_frames: int, size=(256, 512), frames: int = 12, split: str = "train",
                 degradation: float = 0.5, transform=None, seed: int = 0, progress: bool = False,
                 first_target: int | None = None):
        from tqdm import tqdm

        from .synthetic import ClipSpec, make_street_clip_with_damage
        if frames <= memory_frames:
            raise InputError(f"synthetic clips need more than T={memory_frames} frames, got {frames}")
        first = memory_frames if first_target is None else int(first_target)
        if not memory_frames <= first < frames:
            raise InputError(f"the first synthetic target frame must lie in T={memory_frames}..{frames - 1} "
                             f"(a full memory, inside the {frames}-frame clip), got {first_target}")
        self.memory_frames = int(memory_frames)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        base = 0 if split == "train" else SYNTHETIC_VAL_SEED
        h, w = size
        specs = [ClipSpec(frames=frames, height=h, width=w, degradation=degradation, seed=base + i)
                 for i in range(count)]
        rendered = [make_street_clip_with_damage(s) for s in tqdm(specs, desc=f"rendering synthetic {split} clips",
                                                                  unit="clip", disable=not progress, leave=False)]
        self.clips = [r[:2] for r in rendered]
        self.damage = [r[2] for r in rendered]  # per clip: where each frame was destroyed
        self.samples = [(c, t) for c in range(count) for t in range(first, frames)]

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        """``dict(image, memory, label, damage)``: ``damage`` marks the target frame's destroyed pixels."""
        c, t = self.samples[index]
        frames, labels = self.clips[c]
        image, memory, label, damage = frames[t], frames[t - self.memory_frames:t], labels[t], self.damage[c][t]
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            image, memory, label, damage = self.transform(image, memory, label, rng=rng, damage=damage)
        return dict(image=image, memory=memory, label=label, damage=damage)



def open_dataset(data, config: ModelConfig, split: str = "train", transform=None, seed: int = 0,
                 synthetic_size=(256, 512), synthetic_frames: int = 12, default_count: int = 16,
                 frames_dir=None, progress: bool = False, synthetic_degradation: float = 0.5,
                 synthetic_first_target: int | None = None):
    """The dataset behind ``--data`` for ``split``: samples ``dict(image (H,W,3), memory (T,H,W,3) oldest first,
    label (H,W))``, uint8. Problems with the data become :class:`InputError`."""
    spec = data if isinstance(data, DataSpec) else parse_data(data)
    T = config.memory_frames
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
            return CityscapesVideo(spec.root, split, memory_frames=T, transform=transform, seed=seed)
        return CamVidVideo(spec.root, split, memory_frames=T, frames_dir=frames_dir, transform=transform, seed=seed)
    except InputError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--data {data}: {e}") from None



class TrainSamples(torch.utils.data.Dataset):
    """Dataset samples as tensors for the training step: ``image`` uint8 [H,W,3], ``memory`` uint8
    [T,H,W,3], ``label`` int64 [H,W] (and ``damage`` bool [H,W] where the dataset knows it). Items are
    addressed by ``(epoch, index)`` (what
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
        sample = {"image": torch.from_numpy(np.ascontiguousarray(s["image"])),
                  "memory": torch.from_numpy(np.ascontiguousarray(memory)),
                  "label": torch.from_numpy(label.astype(np.int64))}
        if s.get("damage") is not None:  # synthetic clips: the loss can weight the destroyed pixels
            sample["damage"] = torch.from_numpy(np.ascontiguousarray(s["damage"], dtype=bool))
        return sample



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
