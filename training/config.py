"""What a training run is: the model configuration (a preset plus ``key=value`` overrides), the
:class:`TrainConfig` of the run (data, schedule, optimiser, augmentation, memory order), and the parsing and
checks of both. A run stores its :class:`TrainConfig` in every checkpoint; resuming compares configs."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np

from tmanet.presets import ON_DISK_KEYS, ModelConfig, get_preset

log = logging.getLogger("tmanet")

# Which frames fill the memory slots. "oldest_first" is the official rule (slot i = frame t-T+i);
# "newest_first" reverses it (slot i = frame t-1-i); "current" puts the current frame t in every slot: the
# same network and compute with no temporal information (the single-frame baseline of an ablation).
MEMORY_ORDERS = ("oldest_first", "newest_first", "current")


class InputError(ValueError):
    """Bad training/evaluation input (data, configuration, output folder): the message says what to fix."""


def _default_names(n: int) -> tuple:
    return tuple(f"class_{i}" for i in range(n))


def _default_palette(n: int) -> tuple:
    rng = np.random.default_rng(12345)
    return tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n))


FIELD_OF_DISK_KEY = {key: name for name, key in ON_DISK_KEYS.items()}


def parse_overrides(items) -> dict:
    """``["key=value", ...]`` -> dict; values are JSON (``16``, ``true``, ``[769,769]``) or plain strings."""
    out = {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = FIELD_OF_DISK_KEY.get(key.strip(), key.strip())  # on disk T is sequence_num; both name it
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
        d.update({ON_DISK_KEYS.get(k, k): v for k, v in changes.items()})  # to_dict's keys: T on disk is sequence_num
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


def check_memory_order(order) -> str:
    """The canonical name of a memory order ("newest-first" is accepted for "newest_first")."""
    name = str(order).replace("-", "_")
    if name not in MEMORY_ORDERS:
        raise InputError(f"memory order must be one of {', '.join(MEMORY_ORDERS)}, got {order!r}")
    return name


@dataclass(frozen=True)
class TrainConfig:
    """What a run computes besides the model: the data, the schedule, the optimiser, the augmentation and
    the memory order (the paper's recipe by default). ``None`` means "not given": a resumed run keeps its own
    value, a new run takes the default (:meth:`completed`). Written into every checkpoint's meta."""
    data: str = "synthetic"
    iters: int = 80000
    batch: int = 8
    lr: float = 0.01
    crop: tuple[int, int] | None = None           # default: the preset's slide window (clipped to synthetic clips)
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    aux_weight: float = 0.4
    ratio_range: tuple[float, float] = (0.5, 2.0)
    synthetic_size: tuple[int, int] = (256, 512)
    synthetic_frames: int = 12
    memory_order: str | None = None               # default "oldest_first"
    synthetic_degradation: float | None = None    # default 0.5
    synthetic_first_target: int | None = None     # None: frame T
    damage_weight: float | None = None            # loss weight of destroyed synthetic pixels; default 1

    def __post_init__(self):
        if self.iters <= 0 or self.batch <= 0:
            raise InputError(f"iters and batch must be positive, got iters={self.iters} batch={self.batch}")
        if self.memory_order is not None:
            object.__setattr__(self, "memory_order", check_memory_order(self.memory_order))
        if self.synthetic_degradation is not None and not 0.0 <= float(self.synthetic_degradation) <= 1.0:
            raise InputError(f"synthetic degradation must lie in [0, 1], got {self.synthetic_degradation}")
        if self.damage_weight is not None and not float(self.damage_weight) > 0:
            raise InputError(f"the damage weight must be positive, got {self.damage_weight}")
        object.__setattr__(self, "data", str(self.data))
        for name, what in (("crop", "crop"), ("synthetic_size", "synthetic size")):
            object.__setattr__(self, name, parse_pair(getattr(self, name), what))
        object.__setattr__(self, "ratio_range", tuple(self.ratio_range))

    def resumed(self, meta: dict) -> TrainConfig:
        """This config continuing the run whose checkpoint meta is ``meta``: what was not given is the run's
        own; what was given and differs is kept with a warning, since the result is then no longer what the
        uninterrupted run would have given (sometimes intended, e.g. a new learning rate). ``iters`` may be
        raised freely."""
        changes = {}
        for name in (f.name for f in dataclasses.fields(self)):
            if name not in meta:  # a run from before this field existed
                continue
            was, now = meta[name], getattr(self, name)
            if isinstance(was, list):
                was = tuple(was)
            if now is None:
                changes[name] = was
            elif name != "iters" and now != was:
                log.warning("resuming with %s=%s, but the run was started with %s=%s", name, _shown(now), name,
                            _shown(was))
        return dataclasses.replace(self, **changes)

    def completed(self, config: ModelConfig, synthetic: bool) -> TrainConfig:
        """Defaults filled in for what is still unset, for a model of ``config`` on synthetic data or not."""
        crop = self.crop
        if crop is None:
            crop = config.slide_crop
            if synthetic:
                crop = tuple(min(c, s) for c, s in zip(crop, self.synthetic_size))
        if not synthetic and self.damage_weight not in (None, 1.0):
            raise InputError("a damage weight needs synthetic data (only the renderer knows which pixels it "
                             "destroyed)")
        return dataclasses.replace(
            self, crop=crop, memory_order=self.memory_order or "oldest_first",
            synthetic_degradation=0.5 if self.synthetic_degradation is None else float(self.synthetic_degradation),
            damage_weight=1.0 if self.damage_weight is None else float(self.damage_weight))

    def meta(self, synthetic: bool) -> dict:
        """The checkpoint meta entries (lists for pairs; the synthetic clip shaping only for synthetic data)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not synthetic:
            del d["synthetic_degradation"], d["synthetic_first_target"], d["damage_weight"]
        return d


def _shown(value):
    return list(value) if isinstance(value, tuple) else value
