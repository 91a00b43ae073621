"""The training loop: TMANet with the paper's recipe (:mod:`.recipe`) on the data of :mod:`.data`, on one process
or many (``torchrun``), configured by a :class:`~.config.TrainConfig`.

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
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tmanet.checkpoints import config_from_checkpoint, load_state, read_checkpoint, save_checkpoint, split_state_dict
from tmanet.model import TMANet
from tmanet.model.tma_head import zero_place_proj
from tmanet.presets import ModelConfig
from tmanet.safe_files import atomic_file, write_json

from .config import InputError, TrainConfig, resolve_config
from .data import DataSpec, EpochSampler, TrainSamples, open_dataset, parse_data
from .recipe import Trainer, init_from_scratch, make_optimizer, poly_lr, unwrap

log = logging.getLogger("tmanet")

LATEST, FINAL = "latest.pth", "final.pth"
MODEL = "model.pth"  # the deployable weights: no auxiliary head, no optimizer state (under half of final.pth)
LOG_CSV, LOG_JSON = "log.csv", "log.json"
CSV_FIELDS = ("iter", "loss", "decode_loss", "aux_loss", "lr", "time", "data_time", "elapsed")


# -- distributed -------------------------------------------------------------------------------------
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



def init_weights(model: TMANet, path) -> list[str]:
    """Load weights from any checkpoint ``load_model`` reads (official, bare, native) into the training
    model. Parts the file lacks start fresh: the auxiliary head with its new weights, the ``place_read``
    projection at zero (so the model starts as exactly the file's model). Returns notes."""
    sd, native, _ = split_state_dict(read_checkpoint(path))
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    head = model.decode_head
    detached, notes = {}, []
    if model.auxiliary_head is not None and not any(k.startswith("auxiliary_head.") for k in sd):
        detached["auxiliary_head"] = (model, model.auxiliary_head)
        notes.append(f"{path} has no auxiliary head: it starts from scratch")
    if head.place_proj is not None and "decode_head.place_proj.weight" not in sd:
        detached["place_proj"] = (head, head.place_proj)
        notes.append(f"{path} has no place read: its projection starts at zero (the file's model exactly)")
    config = model.config.replace(place_read=False) if "place_proj" in detached else model.config
    config_from_checkpoint(sd, config, None)  # names every architecture disagreement
    for name, (owner, _) in detached.items():  # compare against the model without them, then put them back
        setattr(owner, name, None)
    try:
        load_state(model, sd, source=str(path))
    finally:
        for name, (owner, part) in detached.items():
            setattr(owner, name, part)
    if "place_proj" in detached:
        zero_place_proj(head)
    return notes


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



def _truncate_csv(path: Path, last_iter: int):
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(r for r in rows if r.get("iter") and int(r["iter"]) <= last_iter)


# -- the loop ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOptions:
    """How a run executes (not what it computes): its folder, loader workers, starting weights, logging and
    checkpoint cadence, a time slice, autocast and the progress bar."""
    out: Path
    workers: int = 2
    init: str | Path | None = None
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_every: int | None = 8000
    stop_after: int | None = None
    frames_dir: str | Path | None = None
    amp: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.workers < 0:
            raise InputError(f"workers must be >= 0, got {self.workers}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise InputError(f"stop_after must be positive, got {self.stop_after}")


def train(preset_or_config=None, data="synthetic", out_dir="runs/train", iters: int = 80000,
          batch: int = 8, lr: float = 0.01, resume: bool = False, crop=None, workers: int = 2, seed: int = 0,
          overrides=None, init=None, device=None, momentum: float = 0.9, weight_decay: float = 5e-4,
          power: float = 0.9, min_lr: float = 1e-4, aux_weight: float = 0.4, ratio_range=(0.5, 2.0),
          log_every: int = 10, checkpoint_every: int = 1000, keep_every: int | None = 8000,
          stop_after: int | None = None, synthetic_size=(256, 512), synthetic_frames: int = 12,
          frames_dir=None, amp: bool = False, progress: bool = True, memory_order: str | None = None,
          synthetic_degradation: float | None = None, synthetic_first_target: int | None = None,
          damage_weight: float | None = None) -> dict:
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
    (:data:`~.config.MEMORY_ORDERS`). ``synthetic_degradation`` (default 0.5) and ``synthetic_first_target``
    (default T) shape synthetic training clips; ``damage_weight`` (default 1) weights the pixels their
    degradation destroyed in the loss, where only the memory can tell the scene. Returns the summary written to log.json.
    """
    recipe = TrainConfig(data=str(data), iters=iters, batch=batch, lr=lr, crop=crop, seed=seed, momentum=momentum,
                         weight_decay=weight_decay, power=power, min_lr=min_lr, aux_weight=aux_weight,
                         ratio_range=ratio_range, synthetic_size=synthetic_size, synthetic_frames=synthetic_frames,
                         memory_order=memory_order, synthetic_degradation=synthetic_degradation,
                         synthetic_first_target=synthetic_first_target, damage_weight=damage_weight)
    run = RunOptions(Path(out_dir), workers, init, log_every, checkpoint_every, keep_every, stop_after, frames_dir,
                     amp, progress)
    return train_run(preset_or_config, recipe, run, overrides=overrides, resume=resume, device=device)


def train_run(preset_or_config, recipe: TrainConfig, run: RunOptions, overrides=None, resume: bool = False,
              device=None) -> dict:
    """:func:`train` with its settings as objects. The configuration is resolved first (cheap), so that bad
    input fails before anything is written."""
    spec = parse_data(recipe.data)
    ckpt = _resume_checkpoint(run.out) if resume else None
    if ckpt is not None:
        config, preset = _resumed_model_config(ckpt, preset_or_config, overrides, run.out / LATEST)
        recipe = recipe.resumed(ckpt.get("meta", {}))
    else:
        config, preset = _new_model_config(preset_or_config, overrides, run.out)
    recipe = recipe.completed(config, spec.kind == "synthetic")
    dev_req = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    dist_state = setup_distributed(torch.device(dev_req).type)
    finished = False
    try:
        summary = _train(config, preset, spec, recipe, run, ckpt, _pick_device(device, dist_state.local_rank),
                         dist_state)
        finished = True
        return summary
    finally:
        if dist_state.initialized_here:
            import torch.distributed as dist
            if finished and dist_state.world_size > 1:
                # Rank 0 is still writing the final checkpoints: a rank that tears its gloo group down while
                # the other still holds the connection can abort the process ("terminate called without an
                # active exception"). Leave together; after an error, leave at once (a barrier could hang).
                dist.barrier()
            dist.destroy_process_group()


def _resume_checkpoint(out: Path) -> dict:
    latest = out / LATEST
    if not latest.is_file():
        raise InputError(f"--resume: {latest} does not exist (nothing to resume; drop --resume to start)")
    ckpt = read_checkpoint(latest)
    if "optimizer" not in ckpt or "iter" not in ckpt:
        raise InputError(f"{latest} is not a training checkpoint (no optimizer state / iteration)")
    return ckpt


def _resumed_model_config(ckpt, preset_or_config, overrides, latest) -> tuple[ModelConfig, str | None]:
    """The run's own model config; a preset or overrides given with ``resume`` must agree with it."""
    config = ModelConfig.from_dict(ckpt["config"])
    if preset_or_config is not None or overrides:
        wanted, _ = resolve_config(preset_or_config if preset_or_config is not None else config, overrides)
        if wanted != config:
            diff = [k for k in wanted.to_dict() if wanted.to_dict()[k] != config.to_dict()[k]]
            raise InputError(f"--resume: {latest} was trained with another config (differs in {diff}); "
                             "drop --preset/--config-override or use another --out")
    return config, ckpt.get("meta", {}).get("preset")


def _new_model_config(preset_or_config, overrides, out: Path) -> tuple[ModelConfig, str | None]:
    if preset_or_config is None:
        raise InputError("a preset (or config) is needed to start training")
    if (out / LATEST).is_file():
        raise InputError(f"{out} already holds a training run ({LATEST}): pass --resume to continue it or "
                         "choose another --out")
    return resolve_config(preset_or_config, overrides)


def _train(config: ModelConfig, preset, spec: DataSpec, recipe: TrainConfig, run: RunOptions, ckpt, device,
           d: Dist) -> dict:
    if recipe.batch % d.world_size:
        raise InputError(f"the batch ({recipe.batch}) must be a multiple of the number of processes "
                         f"({d.world_size})")
    if run.amp and device.type != "cuda":
        raise InputError("--amp (bfloat16 autocast) is for CUDA devices")
    samples = _training_samples(config, spec, recipe, run, d)
    torch.manual_seed(recipe.seed)  # identical initial weights on every rank
    model, notes, start = _initial_model(config, run, ckpt)
    model, optimizer = _placed(model, recipe, ckpt, device, d)
    trainer = Trainer(model, optimizer, device, recipe.aux_weight, run.amp, recipe.damage_weight)
    end = recipe.iters if run.stop_after is None else min(recipe.iters, start + run.stop_after)
    meta = {"preset": preset, "world_size": d.world_size, **recipe.meta(spec.kind == "synthetic")}
    # Where the weights started (a resumed run keeps its first invocation's --init): part of a model's provenance.
    init = ckpt.get("meta", {}).get("init") if ckpt is not None else run.init and str(Path(run.init).resolve())
    if init:
        meta["init"] = init
    log_csv = _CsvLog(run.out, resumed_at=start if ckpt is not None else None) if d.main else None
    if d.main:
        log.info("training %s on %s: %d samples, iterations %d..%d, batch %d (%d process(es)), crop %dx%d, "
                 "memory %s, %s", preset or "custom config", recipe.data, len(samples), start, end, recipe.batch,
                 d.world_size, *recipe.crop, recipe.memory_order, device)
    started = time.perf_counter()
    try:
        loop = _iterate(trainer, _loader(samples, recipe, run, d, device, start), recipe, run, d, device,
                        start, end, meta, log_csv)
    finally:
        if log_csv is not None:
            log_csv.close()
    elapsed = time.perf_counter() - started
    if d.main and start == end == recipe.iters and not (run.out / FINAL).is_file():
        _save_final(trainer, meta, run.out, loop.it)  # resumed a finished run whose final.pth went missing
    summary = _summary(config, preset, recipe, run, d, device, len(samples), start, loop, elapsed, meta, notes)
    if d.main:
        _write_log_json(run.out, summary, start)
    return summary


def _training_samples(config, spec, recipe: TrainConfig, run: RunOptions, d: Dist) -> TrainSamples:
    from .datasets import TrainTransform
    transform = TrainTransform(recipe.crop, ratio_range=recipe.ratio_range, flip_prob=0.5, seed=recipe.seed)
    dataset = open_dataset(spec, config, "train", transform, recipe.seed, recipe.synthetic_size,
                           recipe.synthetic_frames, frames_dir=run.frames_dir, progress=run.progress and d.main,
                           synthetic_degradation=recipe.synthetic_degradation,
                           synthetic_first_target=recipe.synthetic_first_target)
    return TrainSamples(dataset, config.num_classes, recipe.memory_order)


def _initial_model(config, run: RunOptions, ckpt) -> tuple[TMANet, list[str], int]:
    """(model, notes, first iteration): from scratch, from ``run.init``'s weights, or the resumed run's."""
    model = init_from_scratch(TMANet(config, with_aux=True))
    notes = init_weights(model, run.init) if run.init and ckpt is None else []
    for note in notes:
        log.info(note)
    if ckpt is None:
        return model, notes, 0
    try:  # the same architecture wrote it: load everything, BN counters included
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise InputError(f"{run.out / LATEST} does not fit its own config: {e}") from None
    return model, notes, int(ckpt["iter"])


def _placed(model, recipe: TrainConfig, ckpt, device, d: Dist):
    """(model, optimizer) on ``device``, with SyncBN and DDP across processes."""
    model.to(device)
    if d.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, recipe.lr, recipe.momentum, recipe.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if d.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model, optimizer


def _loader(samples, recipe: TrainConfig, run: RunOptions, d: Dist, device, start: int):
    per_rank = recipe.batch // d.world_size
    return torch.utils.data.DataLoader(
        samples, batch_size=per_rank,
        sampler=EpochSampler(samples, d.world_size, d.rank, recipe.seed, start * per_rank),
        num_workers=run.workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False, prefetch_factor=2 if run.workers else None)


class _CsvLog:
    """``log.csv`` of the main process: one row per logged window; a resumed run first drops the rows
    logged after its checkpoint (they are logged again)."""

    def __init__(self, out: Path, resumed_at: int | None):
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOG_CSV
        if resumed_at is not None:
            _truncate_csv(path, resumed_at)
        new = not path.is_file()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, CSV_FIELDS)
        if new:
            self.writer.writeheader()

    def row(self, **values):
        self.writer.writerow(values)
        self.file.flush()

    def close(self):
        self.file.close()


@dataclass
class _LoopState:
    it: int
    last: dict | None = None                                  # the last logged window's mean losses
    saved: list = field(default_factory=list)                     # periodic checkpoints written
    step_times: list = field(default_factory=list)


def _iterate(trainer: Trainer, loader, recipe: TrainConfig, run: RunOptions, d: Dist, device, start: int, end: int,
             meta: dict, log_csv: _CsvLog | None) -> _LoopState:
    """Iterations ``start``..``end``: one step each, the window's mean losses logged every ``log_every``,
    checkpoints on the main process."""
    from tqdm import tqdm
    state = _LoopState(start)
    bar = tqdm(total=recipe.iters, initial=start, desc="train", unit="it", disable=not (run.progress and d.main),
               dynamic_ncols=True)
    started = time.perf_counter()
    window = {k: [] for k in ("loss", "decode_loss", "aux_loss", "time", "data_time")}
    try:
        data_iter = iter(loader)
        while state.it < end:
            t0 = time.perf_counter()
            batch_data = next(data_iter)
            t1 = time.perf_counter()
            # dropout masks are a function of the iteration
            torch.manual_seed(_iteration_seed(recipe.seed, state.it, d.rank))
            cur_lr = poly_lr(state.it, recipe.iters, recipe.lr, recipe.power, recipe.min_lr)
            res = trainer.step(batch_data, cur_lr)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            if not math.isfinite(res.loss):
                raise RuntimeError(f"the loss became {res.loss} at iteration {state.it}: lower the learning rate")
            state.it += 1
            it = state.it
            state.step_times.append(t2 - t0)
            for k, v in (("loss", res.loss), ("decode_loss", res.decode_loss), ("aux_loss", res.aux_loss),
                         ("time", t2 - t0), ("data_time", t1 - t0)):
                window[k].append(v)
            if it % run.log_every == 0 or it == end:
                state.last = _log_window(window, d, device, log_csv, it, cur_lr, time.perf_counter() - started)
                window = {k: [] for k in window}
            if d.main:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{cur_lr:.2e}", refresh=False)
                _checkpoints_due(trainer, meta, run, recipe.iters, end, it, state.saved)
    finally:
        bar.close()
    return state


def _log_window(window: dict, d: Dist, device, log_csv: _CsvLog | None, it: int, lr: float, elapsed: float) -> dict:
    """The window's mean losses over all processes, written as a log.csv row by the main process."""
    means = _all_mean([float(np.mean(window[k])) for k in ("loss", "decode_loss", "aux_loss")],
                      d, device if device.type == "cuda" else "cpu")
    last = dict(zip(("loss", "decode_loss", "aux_loss"), means))
    if log_csv is not None:
        log_csv.row(iter=it, **{k: f"{v:.6f}" for k, v in last.items()}, lr=f"{lr:.6g}",
                    time=f"{np.mean(window['time']):.4f}", data_time=f"{np.mean(window['data_time']):.4f}",
                    elapsed=f"{elapsed:.1f}")
    return last


def _checkpoints_due(trainer: Trainer, meta: dict, run: RunOptions, iters: int, end: int, it: int, saved: list):
    if run.keep_every and it % run.keep_every == 0 and it < iters:
        _save_training(trainer, meta, run.out / f"iter_{it}.pth", it)
        saved.append(f"iter_{it}.pth")
    if it % run.checkpoint_every == 0 or it == end:
        _save_training(trainer, meta, run.out / LATEST, it)
        if it == iters:
            _save_final(trainer, meta, run.out, it)


def _save_training(trainer: Trainer, meta: dict, path: Path, it: int):
    """A resumable checkpoint: the model with its auxiliary head, the optimizer state and the iteration."""
    save_checkpoint(unwrap(trainer.model), path, meta=_plain({**meta, "iter": it, "saved": time.time()}),
                    extra={"optimizer": trainer.optimizer.state_dict(), "iter": it})


def _save_final(trainer: Trainer, meta: dict, out: Path, it: int):
    _save_training(trainer, meta, out / FINAL, it)
    save_model(unwrap(trainer.model), out / MODEL, {**meta, "iter": it})


def _summary(config, preset, recipe: TrainConfig, run: RunOptions, d: Dist, device, samples: int, start: int,
             loop: _LoopState, elapsed: float, meta: dict, notes: list) -> dict:
    it, iters = loop.it, recipe.iters
    steady = loop.step_times[min(5, len(loop.step_times) // 2):]  # the first iterations pay for warm-up
    return {
        "preset": preset, "config": config.to_dict(), "data": recipe.data, "samples": samples,
        "device": str(device), "world_size": d.world_size, "batch": recipe.batch, "crop": list(recipe.crop),
        "iters": iters, "memory_order": recipe.memory_order, "start_iter": start, "end_iter": it,
        "finished": it >= iters, "seconds": round(elapsed, 3),
        "iters_per_second": (it - start) / elapsed if it > start and elapsed > 0 else None,
        "steady_iters_per_second": len(steady) / sum(steady) if steady else None,
        "last_log": loop.last, "checkpoints": {"latest": LATEST, "final": FINAL if it >= iters else None,
                                               "model": MODEL if it >= iters else None,
                                               "periodic": loop.saved},
        "recipe": {k: meta[k] for k in ("lr", "momentum", "weight_decay", "power", "min_lr", "aux_weight",
                                        "ratio_range", "seed")},
        "init": str(run.init) if run.init else None, "notes": notes,
    }


def _write_log_json(out: Path, summary: dict, start: int):
    """log.json: this invocation's summary, the earlier invocations of a resumed run as its history."""
    history = []
    if (out / LOG_JSON).is_file() and start > 0:
        try:
            prev = json.loads((out / LOG_JSON).read_text())
            history = prev.pop("history", []) + [prev]
        except (json.JSONDecodeError, AttributeError):
            history = []
    write_json(out / LOG_JSON, _plain({**summary, "history": history}))
