"""Video segmentation loaders for the file layouts used by the official TMANet code.

Each sample is an annotated target frame plus ``memory_frames`` earlier frames of the same
sequence (the temporal memory), ordered OLDEST FIRST: memory ``[t-T, ..., t-1]``, the frame just
before the target last. With ``random_select`` and ``sequence_range > T`` the offsets are a random
T-subset of ``1..sequence_range`` sorted descending (still oldest first), as in the official
sampler. Memory frames before the first existing frame of a sequence are clamped to that frame
(warm-up at the start of a video); any other missing memory frame is a FileNotFoundError.

Randomness (offsets and transforms) comes from ``numpy.random.default_rng([seed, epoch, index])``,
so a sample depends only on (seed, epoch, index): reproducible and safe with any number of
DataLoader workers. Call ``set_epoch`` to draw new offsets/augmentations per epoch. Unlike the
official code, which draws the offsets once when the dataset is built, offsets vary per epoch.

Plain numpy + Pillow; no torch needed.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image

from tmanet.metrics import IGNORE_INDEX


def read_rgb(path) -> np.ndarray:
    """uint8 (H, W, 3) RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_label(path) -> np.ndarray:
    """uint8 (H, W) class ids; palette PNGs give their indices, RGB files their first channel."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            im = im.getchannel(0)
        arr = np.asarray(im)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"label {path} has values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr.copy()


@dataclass(frozen=True)
class _Sample:
    image: Path
    label: Path
    frame: int               # frame number of the target
    first: int | None        # warm-up clamp: earliest frame memory may use (None: unknown, no clamping)
    memory_dir: Path
    memory_template: str     # file name with a "{frame}" field
    width: int               # zero padding of the frame number

    def memory_path(self, frame: int) -> Path:
        return self.memory_dir / self.memory_template.format(frame=str(frame).zfill(self.width))


class _VideoDataset:
    """Shared sampling / loading; subclasses fill ``self.samples``."""

    samples: list[_Sample]

    def _init_common(self, memory_frames, sequence_range, random_select, transform, seed, label_map):
        if memory_frames < 0:
            raise ValueError(f"memory_frames must be >= 0, got {memory_frames}")
        sequence_range = memory_frames if sequence_range is None else sequence_range
        if sequence_range < memory_frames:
            raise ValueError(f"sequence_range ({sequence_range}) must be >= memory_frames ({memory_frames})")
        self.memory_frames = int(memory_frames)
        self.sequence_range = int(sequence_range)
        self.random_select = bool(random_select)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._lut = None
        if label_map:
            self._lut = np.arange(256, dtype=np.uint8)
            for src, dst in label_map.items():
                self._lut[int(src)] = int(dst)
        self._transform_takes_rng = False
        if transform is not None:
            try:
                self._transform_takes_rng = "rng" in inspect.signature(transform).parameters
            except (TypeError, ValueError):
                pass

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw memory offsets and augmentations (deterministically) for another epoch."""
        self.epoch = int(epoch)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def memory_offsets(self, index: int) -> list[int]:
        """Offsets of the memory frames from the target, descending (= oldest frame first)."""
        T, R = self.memory_frames, self.sequence_range
        if not self.random_select or R == T:
            return list(range(T, 0, -1))
        picked = self._rng(index, 0).choice(np.arange(1, R + 1), size=T, replace=False)
        return sorted((int(o) for o in picked), reverse=True)

    def memory_frame_numbers(self, index: int) -> list[int]:
        """Frame numbers of the memory, oldest first, clamped to the sequence's first frame."""
        s = self.samples[index]
        frames = [s.frame - o for o in self.memory_offsets(index)]
        if s.first is not None:
            frames = [max(f, s.first) for f in frames]
        return [max(f, 0) for f in frames]

    def memory_paths(self, index: int) -> list[Path]:
        s = self.samples[index]
        return [s.memory_path(f) for f in self.memory_frame_numbers(index)]

    def _load_label(self, path: Path) -> np.ndarray:
        label = read_label(path)
        return self._lut[label] if self._lut is not None else label

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        s = self.samples[index]
        image = read_rgb(s.image)
        label = self._load_label(s.label)
        if label.shape != image.shape[:2]:
            raise ValueError(f"label {s.label} is {label.shape}, image {s.image} is {image.shape[:2]}")
        mem_paths = self.memory_paths(index)
        memory = np.empty((len(mem_paths),) + image.shape, np.uint8)
        for k, p in enumerate(mem_paths):
            if not p.is_file():
                raise FileNotFoundError(f"memory frame {p} (for target {s.image}) does not exist")
            frame = read_rgb(p)
            if frame.shape != image.shape:
                raise ValueError(f"memory frame {p} is {frame.shape}, target {s.image} is {image.shape}")
            memory[k] = frame
        if self.transform is not None:
            if self._transform_takes_rng:
                image, memory, label = self.transform(image, memory, label, rng=self._rng(index, 1))
            else:
                image, memory, label = self.transform(image, memory, label)
        return dict(image=image, memory=memory, label=label, target_path=str(s.image),
                    label_path=str(s.label), memory_paths=[str(p) for p in mem_paths])


def _frame_index(folder: Path, pattern: re.Pattern, key: Callable[[re.Match], tuple]) -> dict[tuple, np.ndarray]:
    """Sorted frame numbers per sequence key among the files of ``folder``."""
    frames: dict[tuple, list[int]] = {}
    if folder.is_dir():
        with os.scandir(folder) as it:
            for entry in it:
                m = pattern.match(entry.name)
                if m:
                    frames.setdefault(key(m), []).append(int(m.group("num")))
    return {k: np.unique(np.array(v, np.int64)) for k, v in frames.items()}


def _warm_up_start(existing: np.ndarray | None, frame: int) -> int | None:
    """Warm-up clamp for target ``frame``: the sequence's first existing frame, but never a frame
    after the target (memory must not come from the future); None if the sequence is unknown.

    Frames missing after that point are errors, not clamped: a hole in a video is a data problem.
    """
    if existing is None or existing.size == 0:
        return None
    return min(int(existing[0]), frame)


class CityscapesVideo(_VideoDataset):
    """Cityscapes video: targets are the ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` files.

    Target and memory images come from
    ``leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame:06d}_leftImg8bit.png`` (the target
    falls back to ``leftImg8bit/{split}/{city}/`` when the sequence folder lacks it).
    """

    _IMG = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<num>\d+)_leftImg8bit\.png$")

    def __init__(self, root, split: str = "train", memory_frames: int = 2, sequence_range: int | None = None,
                 random_select: bool = True, transform=None, seed: int = 0, *,
                 label_suffix: str = "_gtFine_labelTrainIds.png", label_map: Mapping[int, int] | None = None):
        self._init_common(memory_frames, sequence_range, random_select, transform, seed, label_map)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Cityscapes root {self.root} does not exist")
        ann_root = self.root / "gtFine" / split
        seq_root = self.root / "leftImg8bit_sequence" / split
        still_root = self.root / "leftImg8bit" / split
        if not ann_root.is_dir():
            raise FileNotFoundError(f"Cityscapes label folder {ann_root} does not exist")
        label_re = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<num>\d+)" + re.escape(label_suffix) + "$")
        self.samples = []
        for city_dir in sorted(p for p in ann_root.iterdir() if p.is_dir()):
            existing = _frame_index(seq_root / city_dir.name, self._IMG, lambda m: (m["city"], m["seq"]))
            for label in sorted(city_dir.iterdir()):
                m = label_re.match(label.name)
                if not m:
                    continue
                city, seq, num = m["city"], m["seq"], m["num"]
                name = f"{city}_{seq}_{num}_leftImg8bit.png"
                image = seq_root / city_dir.name / name
                if not image.is_file():
                    still = still_root / city_dir.name / name
                    if not still.is_file():
                        raise FileNotFoundError(f"image for label {label} not found: {image} (nor {still})")
                    image = still
                self.samples.append(_Sample(
                    image=image, label=label, frame=int(num), first=_warm_up_start(existing.get((city, seq)), int(num)),
                    memory_dir=seq_root / city_dir.name,
                    memory_template=f"{city}_{seq}_{{frame}}_leftImg8bit.png", width=len(num)))
        if not self.samples:
            raise ValueError(f"no Cityscapes samples: no *{label_suffix} files under {ann_root}")


class CamVidVideo(_VideoDataset):
    """CamVid video in either of two layouts (names like ``0001TP_006690``, ``Seq05VD_f00030``):

    - the official TMANet layout, chosen when ``{root}/annotations/{split}.txt`` exists: the split file
      lists names; images ``{root}/images/{name}.png``, labels ``{root}/labels/{name}_L.png`` (class-id PNGs,
      as the official ``CamVidVideoDataset`` reads them), memory frames from ``{root}/images_sequence/``;
    - the SegNet layout: ``{root}/{split}/{name}.png`` images, ``{root}/{split}annot/{name}.png`` labels,
      memory frames from the image folder.

    Memory frames keep the target's sequence name, letter prefix and zero padding. ``frames_dir``
    (absolute, or relative to ``root``) overrides where they are read from: CamVid labels every 30th frame,
    so real memory needs a folder holding the full-rate frames.
    """

    _NAME = re.compile(r"^(?P<seq>.+)_(?P<prefix>[A-Za-z]*)(?P<num>\d+)\.png$")

    def __init__(self, root, split: str = "train", memory_frames: int = 4, sequence_range: int | None = None,
                 random_select: bool = True, frames_dir=None, transform=None, seed: int = 0, *,
                 label_map: Mapping[int, int] | None = None):
        self._init_common(memory_frames, sequence_range, random_select, transform, seed, label_map)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"CamVid root {self.root} does not exist")
        split_file = self.root / "annotations" / f"{split}.txt"
        self.layout = "official" if split_file.is_file() else "segnet"
        if self.layout == "official":
            img_dir, ann_dir = self.root / "images", self.root / "labels"
            default_frames = self.root / "images_sequence"
        else:
            img_dir, ann_dir = self.root / split, self.root / f"{split}annot"
            default_frames = img_dir
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"CamVid folder {d} does not exist")
        mem_dir = default_frames if frames_dir is None else Path(frames_dir)
        if not mem_dir.is_absolute():
            mem_dir = self.root / mem_dir
        if not mem_dir.is_dir():
            raise FileNotFoundError(f"CamVid frames folder {mem_dir} does not exist")
        self.frames_dir = mem_dir
        existing = _frame_index(mem_dir, self._NAME, lambda m: (m["seq"], m["prefix"]))
        if self.layout == "official":
            names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            pairs = [(img_dir / f"{n}.png", ann_dir / f"{n}_L.png") for n in names]
            where = f"{split_file} lists no names"
        else:
            pairs = [(image, ann_dir / image.name) for image in sorted(img_dir.iterdir())
                     if image.suffix.lower() == ".png" and image.is_file()]
            where = f"no .png images in {img_dir}"
        self.samples = []
        for image, label in pairs:
            m = self._NAME.match(image.name)
            if not m:
                raise ValueError(f"CamVid image {image} is not named {{sequence}}_{{frame}}.png")
            if not image.is_file():
                raise FileNotFoundError(f"CamVid image {image} (listed in {split_file}) does not exist")
            if not label.is_file():
                raise FileNotFoundError(f"label for {image} not found: {label}")
            seq, prefix, num = m["seq"], m["prefix"], m["num"]
            self.samples.append(_Sample(
                image=image, label=label, frame=int(num), first=_warm_up_start(existing.get((seq, prefix)), int(num)),
                memory_dir=mem_dir, memory_template=f"{seq}_{prefix}{{frame}}.png", width=len(num)))
        if not self.samples:
            raise ValueError(f"no CamVid samples: {where}")


# --------------------------------------------------------------------------------------------
# Training transform (mmseg order: Resize -> RandomCrop -> RandomFlip -> [PhotoMetric] -> Pad)

def _resize(img: np.ndarray, size_hw: tuple[int, int], resample) -> np.ndarray:
    if img.shape[:2] == size_hw:
        return img
    return np.asarray(Image.fromarray(img).resize((size_hw[1], size_hw[0]), resample))


class TrainTransform:
    """Random resize, crop, horizontal flip and pad, with the SAME geometry for the target image,
    every memory frame and the label (images bilinear, labels nearest; pad 0 / ``ignore_index``).

    ``img_scale=None`` scales the input size by a ratio from ``ratio_range``; ``img_scale=(long,
    short)`` reproduces mmseg's keep-ratio Resize (e.g. (2048, 1024) for Cityscapes). mmseg's
    ``cat_max_ratio`` crop retry is not implemented. ``photometric=True`` adds brightness /
    contrast / saturation jitter drawn independently per frame, as the official pipeline does.
    Without an explicit ``rng`` each call draws from the transform's own seeded generator.
    """

    def __init__(self, crop_size=(512, 1024), ratio_range=(0.5, 2.0), flip_prob: float = 0.5, seed: int = 0,
                 *, img_scale: tuple[int, int] | None = None, photometric: bool = False,
                 pad_value: int = 0, ignore_index: int = IGNORE_INDEX):
        if crop_size[0] <= 0 or crop_size[1] <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < min <= max, got {ratio_range}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.flip_prob = float(flip_prob)
        self.img_scale = img_scale
        self.photometric = photometric
        self.pad_value = pad_value
        self.ignore_index = ignore_index
        self._rng = np.random.default_rng(seed)

    def resized_shape(self, h: int, w: int, ratio: float) -> tuple[int, int]:
        if self.img_scale is None:
            return max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
        long_edge, short_edge = max(self.img_scale) * ratio, min(self.img_scale) * ratio
        factor = min(int(long_edge) / max(h, w), int(short_edge) / min(h, w))
        return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))

    def sample_params(self, h: int, w: int, rng: np.random.Generator) -> dict:
        """The random geometry for an (h, w) input: resized shape, crop box, flip."""
        ratio = rng.uniform(*self.ratio_range)
        nh, nw = self.resized_shape(h, w, ratio)
        ch, cw = self.crop_size
        y0 = int(rng.integers(0, max(nh - ch, 0) + 1))
        x0 = int(rng.integers(0, max(nw - cw, 0) + 1))
        flip = bool(rng.random() < self.flip_prob)
        return dict(size=(nh, nw), crop=(y0, min(y0 + ch, nh), x0, min(x0 + cw, nw)), flip=flip)

    def _photometric(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = img.astype(np.float32)
        if rng.random() < 0.5:
            out += rng.uniform(-32, 32)
        if rng.random() < 0.5:
            out *= rng.uniform(0.5, 1.5)
        if rng.random() < 0.5:
            grey = out.mean(axis=-1, keepdims=True)
            out = grey + (out - grey) * rng.uniform(0.5, 1.5)
        return np.clip(out, 0, 255).astype(np.uint8)

    def _geometry(self, img: np.ndarray, p: dict, resample, fill) -> np.ndarray:
        img = _resize(img, p["size"], resample)
        y0, y1, x0, x1 = p["crop"]
        img = img[y0:y1, x0:x1]
        if p["flip"]:
            img = img[:, ::-1]
        ch, cw = self.crop_size
        if img.shape[0] < ch or img.shape[1] < cw:  # pad bottom / right like mmseg's Pad(size=crop)
            pad = ((0, ch - img.shape[0]), (0, cw - img.shape[1])) + ((0, 0),) * (img.ndim - 2)
            img = np.pad(img, pad, constant_values=fill)
        return np.ascontiguousarray(img)

    def __call__(self, image: np.ndarray, memory: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None, damage: np.ndarray | None = None):
        """(image, memory, label) with one random geometry; with a bool ``damage`` map of the target frame
        (where it was destroyed) also that map, moved like the label (padding counts as intact)."""
        rng = self._rng if rng is None else rng
        p = self.sample_params(image.shape[0], image.shape[1], rng)
        bil, near = Image.Resampling.BILINEAR, Image.Resampling.NEAREST
        out_img = self._geometry(image, p, bil, self.pad_value)
        out_mem = np.stack([self._geometry(m, p, bil, self.pad_value) for m in memory]) if len(memory) else \
            np.empty((0,) + out_img.shape, np.uint8)
        out_lab = self._geometry(label, p, near, self.ignore_index)
        out_damage = None if damage is None else \
            self._geometry(np.asarray(damage, np.uint8), p, near, 0).astype(bool)
        if self.photometric:
            # Distort only the un-padded area: mmseg pads after the distortion.
            h, w = p["crop"][1] - p["crop"][0], p["crop"][3] - p["crop"][2]
            out_img[:h, :w] = self._photometric(out_img[:h, :w], rng)
            for k in range(len(out_mem)):
                out_mem[k, :h, :w] = self._photometric(out_mem[k, :h, :w], rng)
        return (out_img, out_mem, out_lab) if damage is None else (out_img, out_mem, out_lab, out_damage)


__all__ = ["IGNORE_INDEX", "CityscapesVideo", "CamVidVideo", "TrainTransform", "read_rgb", "read_label"]
