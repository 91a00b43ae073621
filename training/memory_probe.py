"""A task only memory can solve: does a TMANet trained with ``tmanet.training`` use its memory?

Each clip is a static mosaic (no ego-motion): a grid of cells, each of a class drawn at random (a flat class
colour plus pixel noise), the same in every frame. Every frame blanks one cell (black), never the cell the
previous frame blanked, so the content of a blanked cell is visible in the frame just before. The classes of
neighbouring cells are independent: from the current frame alone a blanked cell's class is a guess (about
1 / ``classes`` right); with the previous frame in memory it is known.

The same small network is trained two ways and scored three ways on the blanked pixels of held-out clips:

- ``memory``: T memory frames, oldest first (the official rule), scored with real memory,
- ``memory, current at test``: the same weights with the current frame in every memory slot,
- ``single-frame``: trained and scored with the current frame in every slot (same compute, no history).

Training draws a fresh clip for every sample. On a fixed set of 64 clips the network instead learned each
training clip's hidden cells by heart (training loss far below chance on them, held-out hidden cells barely
above chance): memorising the data is easier than learning to read memory, and a small fixed training set
hides whether the memory path works.

    python -m tmanet.training.memory_probe --out runs/memory_probe --iters 1200   # ~10 min on one CPU core
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tmanet.safe_files import write_json

PROBE_SEED_VAL = 2 ** 40  # held-out clips use seeds disjoint from the training clips


@dataclass(frozen=True)
class ProbeSpec:
    """The mosaic clips: size in pixels, a ``grid`` of rows x columns of cells, ``classes`` cell classes."""
    frames: int = 6
    height: int = 64
    width: int = 128
    grid: tuple = (2, 4)
    classes: int = 4
    noise: float = 20.0  # std of the per-pixel colour noise


# Distinct, saturated class colours (none of them black, the blank).
_COLORS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 220], [230, 210, 40], [200, 60, 210], [40, 210, 210],
                    [240, 140, 30], [150, 150, 150]], np.float32)


def probe_clip(spec: ProbeSpec, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames uint8 ``[F,H,W,3]``, labels uint8 ``[F,H,W]``, blanked bool ``[F,H,W]``) of one mosaic clip."""
    if not 2 <= spec.classes <= len(_COLORS):
        raise ValueError(f"classes must lie in 2..{len(_COLORS)}, got {spec.classes}")
    rng = np.random.default_rng([seed, 0x3E3])
    rows, cols = spec.grid
    cells = rng.integers(0, spec.classes, (rows, cols))
    ch, cw = spec.height // rows, spec.width // cols
    label = np.repeat(np.repeat(cells, ch, 0), cw, 1).astype(np.uint8)
    label = np.pad(label, ((0, spec.height - label.shape[0]), (0, spec.width - label.shape[1])), mode="edge")
    frames = np.empty((spec.frames, spec.height, spec.width, 3), np.uint8)
    blanked = np.zeros((spec.frames, spec.height, spec.width), bool)
    previous = -1
    for t in range(spec.frames):
        img = _COLORS[label] + rng.normal(0.0, spec.noise, label.shape + (3,))
        cell = int(rng.integers(0, rows * cols - (previous >= 0)))
        cell += previous >= 0 and cell >= previous  # any cell but the previous frame's
        r, c = divmod(cell, cols)
        blanked[t, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = True
        img[blanked[t]] = 0.0
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        previous = cell
    return frames, np.repeat(label[None], spec.frames, 0), blanked


def probe_config(spec: ProbeSpec, memory_frames: int = 2):
    """The probe's network: the ablation's narrow ResNet-18 TMANet with ``spec.classes`` classes."""
    from .ablation import small_config
    from .config import resolve_config
    config, _ = resolve_config(small_config().replace(memory_frames=memory_frames), {"num_classes": spec.classes})
    return config


def probe_batch(spec: ProbeSpec, seeds, memory_frames: int, order: str, rng: np.random.Generator) -> dict:
    """A training batch ``dict(image, memory, label)`` (torch tensors): one random target frame t >= T of a
    fresh clip per seed, memory picked by ``order`` (:func:`tmanet.training.recipe.memory_frame_order`)."""
    import torch

    from .recipe import memory_frame_order
    images, memories, labels = [], [], []
    for seed in seeds:
        frames, label, _ = probe_clip(spec, int(seed))
        t = int(rng.integers(memory_frames, spec.frames))
        images.append(frames[t])
        memories.append(frames[memory_frame_order(t, memory_frames, order)])
        labels.append(label[t])
    return {"image": torch.from_numpy(np.stack(images)), "memory": torch.from_numpy(np.stack(memories)),
            "label": torch.from_numpy(np.stack(labels).astype(np.int64))}


def train_probe(spec: ProbeSpec, order: str, iters: int = 600, batch: int = 8, lr: float = 0.02,
                memory_frames: int = 2, seed: int = 0, progress: bool = False, config=None):
    """A from-scratch TMANet (the trainer's initialisation, SGD step and poly schedule) trained with memory
    ``order`` on mosaic clips, a fresh clip for every sample: with a fixed set of clips the network learns
    each clip's hidden cells by heart (training loss far below chance on them, little gain on held-out clips)
    instead of reading its memory. ``config`` (default :func:`probe_config`) must have ``spec.classes``
    classes. Returns (model in eval mode, mean loss of the last 20 steps)."""
    import torch
    from tqdm import tqdm

    from tmanet.model import TMANet

    from .recipe import Trainer, init_from_scratch, make_optimizer, poly_lr
    torch.manual_seed(seed)
    model = init_from_scratch(TMANet(config or probe_config(spec, memory_frames)))
    trainer = Trainer(model, make_optimizer(model, lr), "cpu")
    rng = np.random.default_rng([seed, 0xBA7C4])
    losses = []
    for it in tqdm(range(iters), desc=f"train ({order})", unit="it", disable=not progress, leave=False):
        seeds = [seed * 2 ** 32 + it * batch + k for k in range(batch)]  # below PROBE_SEED_VAL for seed < 256
        losses.append(trainer.step(probe_batch(spec, seeds, memory_frames, order, rng), poly_lr(it, iters, lr)).loss)
    return model.eval(), float(np.mean(losses[-20:]))


def score_probe(model, clips, order: str) -> dict:
    """Scores of ``model`` run with memory ``order`` on frames t >= T of ``clips``: ``blanked`` (the cells
    the current frame hides) and ``visible`` (the rest), each ``{miou, pixel_accuracy, pixels}``."""
    from .ablation import predict_clip
    from tmanet.metrics import confusion_matrix, region_scores
    T, C = model.config.memory_frames, model.config.num_classes
    cm_blank, cm_all = np.zeros((C, C), np.int64), np.zeros((C, C), np.int64)
    for frames, labels, blanked in clips:
        masks = predict_clip(model, frames, order, T)
        gts, hidden = labels[T:], blanked[T:]
        cm_all += confusion_matrix(masks, gts, C)
        cm_blank += confusion_matrix(masks[hidden], gts[hidden], C)
    return {"blanked": region_scores(cm_blank), "visible": region_scores(cm_all - cm_blank)}


def run_probe(spec: ProbeSpec = ProbeSpec(), iters: int = 600, batch: int = 8, lr: float = 0.02,
              eval_clips: int = 16, memory_frames: int = 2, seed: int = 0, progress: bool = False,
              config=None) -> dict:
    """Train the memory and the single-frame network and score them (see the module doc)."""
    config = config or probe_config(spec, memory_frames)
    clips = [probe_clip(spec, PROBE_SEED_VAL + i) for i in range(eval_clips)]
    result = {"spec": asdict(spec), "iters": iters, "batch": batch, "lr": lr, "eval_clips": eval_clips,
              "sequence_num": memory_frames, "seed": seed, "config": config.to_dict(), "runs": {}}
    for name, train_order, test_orders in (("memory", "oldest_first", ("oldest_first", "current")),
                                           ("single-frame", "current", ("current",))):
        started = time.perf_counter()
        model, loss = train_probe(spec, train_order, iters, batch, lr, memory_frames, seed, progress, config)
        seconds = time.perf_counter() - started
        for order in test_orders:
            result["runs"][f"{name}, {order.replace('_', '-')} at test"] = {
                "train_order": train_order, "test_order": order, "final_loss": loss,
                "train_seconds": round(seconds, 1), **score_probe(model, clips, order)}
    return result


def format_probe(result: dict) -> str:
    lines = ["| trained | memory at test | IoU blanked | acc. blanked | mIoU visible | final loss | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"].values():
        b, v = r["blanked"], r["visible"]
        lines.append(f"| {r['train_order'].replace('_', '-')} | {r['test_order'].replace('_', '-')} "
                     f"| {100 * b['miou']:.1f} | {100 * b['pixel_accuracy']:.1f} | {100 * v['miou']:.1f} "
                     f"| {r['final_loss']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tmanet.training.memory_probe", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="folder for probe.json (default: print only)")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--eval-clips", type=int, default=16)
    p.add_argument("--memory-frames", "--sequence-num", type=int, default=2, help="T of the memory network")
    p.add_argument("--size", default="64,128", help="clip size H,W")
    p.add_argument("--grid", default="2,4", help="mosaic cells: rows,columns")
    p.add_argument("--frames", type=int, default=6, help="frames per clip")
    p.add_argument("--config-override", nargs="+", metavar="KEY=VALUE", default=[],
                   help="change fields of the narrow ResNet-18 config (JSON values), e.g. base_channels=8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    import torch

    from .config import InputError, parse_pair, resolve_config
    torch.set_num_threads(args.threads)
    try:
        (h, w), grid = parse_pair(args.size, "--size"), parse_pair(args.grid, "--grid")
        if args.frames <= args.memory_frames or h < grid[0] or w < grid[1]:
            raise InputError(f"clips need more than T={args.memory_frames} frames and at least one pixel per cell")
        spec = ProbeSpec(frames=args.frames, height=h, width=w, grid=grid)
        config, _ = resolve_config(probe_config(spec, args.memory_frames), args.config_override)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_probe(spec, iters=args.iters, batch=args.batch, lr=args.lr, eval_clips=args.eval_clips,
                       memory_frames=args.memory_frames, seed=args.seed, progress=True, config=config)
    print(format_probe(result))
    if args.out:
        print(f"wrote {write_json(Path(args.out) / 'probe.json', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
