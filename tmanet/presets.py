"""Model and dataset presets, kept as plain data.

A preset is a complete :class:`ModelConfig`: the network shape (backbone depth, strides, T, Ck, Cv, classes)
plus what deployment needs to know about the dataset (class names, palette, normalisation, align_corners and
the official slide-inference window).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign symbol", "fence", "car", "pedestrian",
    "bicyclist", "void")
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0))

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

RESNET_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Output stride 8 (official) or 16: strides and dilations of the four ResNet stages.
OUTPUT_STRIDE_LAYOUT = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a TMANet and to deploy it."""
    depth: int = 50
    base_channels: int = 64            # width of the first ResNet stage (64 = standard ResNet)
    output_stride: int = 8
    memory_frames: int = 2             # T: number of memory frames (on disk: sequence_num)
    key_channels: int = 64             # Ck
    value_channels: int = 256          # Cv
    channels: int = 512                # bottleneck width
    num_classes: int = 19
    aggregation: str = "concat"        # official: cat([query_value, memory_read]); "sum" adds them
    place_read: bool = False           # extension: also read the memory at each position's own place
    dropout: float = 0.1
    align_corners: bool = True
    aux_channels: int = 256            # auxiliary FCN head on layer3 (training only)
    class_names: tuple = CITYSCAPES_CLASSES
    palette: tuple = CITYSCAPES_PALETTE
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    slide_crop: tuple = (769, 769)     # official slide-inference window (h, w)
    slide_stride: tuple = (513, 513)

    def __post_init__(self):
        problems = []
        if self.depth not in RESNET_STAGE_BLOCKS:
            problems.append(f"depth {self.depth} not in {sorted(RESNET_STAGE_BLOCKS)}")
        if self.output_stride not in OUTPUT_STRIDE_LAYOUT:
            problems.append(f"output_stride {self.output_stride} not in {sorted(OUTPUT_STRIDE_LAYOUT)}")
        if self.aggregation not in ("concat", "sum"):
            problems.append(f"aggregation {self.aggregation!r} is not 'concat' or 'sum'")
        if not isinstance(self.place_read, bool):
            problems.append(f"place_read must be true or false, got {self.place_read!r}")
        if self.memory_frames < 1:
            problems.append(f"memory_frames must be >= 1, got {self.memory_frames}")
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            problems.append(f"{self.num_classes} classes but {len(self.class_names)} names and "
                            f"{len(self.palette)} palette colours")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def expansion(self) -> int:
        return 1 if self.depth < 50 else 4

    @property
    def in_channels(self) -> int:
        """Channels of the last backbone stage, the TMA head's input."""
        return self.base_channels * 8 * self.expansion

    @property
    def aux_in_channels(self) -> int:
        return self.base_channels * 4 * self.expansion

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as checkpoints and manifests store it: field names, except T under its on-disk key."""
        d = dataclasses.asdict(self)
        return {ON_DISK_KEYS.get(k, k): list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From :meth:`to_dict`'s dict (on disk, T is ``sequence_num``: old checkpoints and exports are read as
        they are); the field name ``memory_frames`` is accepted too."""
        d = dict(d)
        for name, key in ON_DISK_KEYS.items():
            if key in d:
                if name in d and d[name] != d[key]:
                    raise ValueError(f"{key}={d[key]} and {name}={d[name]} disagree (they are the same field)")
                d[name] = d.pop(key)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}")

        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: tup(v) for k, v in d.items()})


# Fields stored under another key on disk: T is ``sequence_num`` in the official configs, checkpoints' configs
# and every manifest (old exports and tmanet/data/demo_model.pth are read as they are).
ON_DISK_KEYS = {"memory_frames": "sequence_num"}

PRESETS: dict[str, ModelConfig] = {
    # configs/video/cityscapes/tmanet_r50-d8_769x769_80k_cityscapes_video.py
    "cityscapes-r50": ModelConfig(depth=50, memory_frames=2, num_classes=19, align_corners=True,
                                  slide_crop=(769, 769), slide_stride=(513, 513)),
    # configs/video/camvid/tmanet_r50-d8_640x640_80k_camvid_video.py (align_corners keeps the base default)
    "camvid-r50": ModelConfig(depth=50, memory_frames=4, num_classes=12, align_corners=False,
                              class_names=CAMVID_CLASSES, palette=CAMVID_PALETTE,
                              slide_crop=(640, 640), slide_stride=(512, 512)),
    # Edge GPUs (Jetson): ResNet-18 at output stride 8, T=2, a lighter head.
    "cityscapes-r18": ModelConfig(depth=18, memory_frames=2, key_channels=64, value_channels=128, channels=256,
                                  aux_channels=128, num_classes=19, align_corners=True,
                                  slide_crop=(769, 769), slide_stride=(513, 513)),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPreset(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


class UnknownPreset(UserError, ValueError):
    """A preset name that is not in :data:`PRESETS`."""
