"""Where does a TMANet's memory read look? For every query position of a frame: the attention weight on the
same place of the memory frames (a ``(2r+1)^2`` window of feature cells around it, summed over the slots) and
the entropy of the read, reported apart for the cells the synthetic degradation destroyed and the intact ones.

TMANet's read has no positional term (softmax of query . key over all T*h*w memory positions). To show what a
destroyed place looked like a frame earlier, a query there must put its weight on that place of the memory;
a read that gathers by content (every road cell of the memory for a road-like query) spreads it instead.
``lift`` is the window's weight over what a uniform read would give it (1: no preference for the same place).
This moves long before the IoU on destroyed pixels does, so it tells early whether a training recipe is
teaching the network to look up its memory.

    python -m tmanet.training.read_locality CKPT [--clips 4] [--size 256,512] [--degradation 0.8]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

REGIONS = ("destroyed", "intact")


def frame_read_weights(model, feats, t: int):
    """Attention weights ``[h*w, T, h, w]`` of frame ``t``'s queries over its memory frames t-T..t-1
    (oldest first), from backbone features ``feats`` ``[F, C, h, w]`` of the clip."""
    from tmanet.model.tma_head import read_weights
    head, T = model.decode_head, model.config.memory_frames
    query_key, _ = head.encode_query(feats[t:t + 1])
    memory_keys, _ = head.encode_memory([feats[t - T + i:t - T + i + 1] for i in range(T)])
    h, w = feats.shape[-2:]
    return read_weights(query_key, memory_keys)[0].reshape(h * w, T, h, w)


def window_mass(weights, radius: int = 1):
    """Per query ``i`` at cell (y, x): the weight ``weights[i]`` (``[h*w, T, h, w]``) puts on the cells within
    ``radius`` of (y, x), all slots together; and the share of cells that window holds (a uniform read's mass)."""
    import torch
    import torch.nn.functional as F
    n, _, h, w = weights.shape
    k = 2 * radius + 1
    box = F.avg_pool2d(weights.sum(1, keepdim=True), k, stride=1, padding=radius, count_include_pad=True) * k * k
    own = torch.arange(n)
    mass = box[:, 0].reshape(n, h * w)[own, own]
    cells = F.avg_pool2d(torch.ones(1, 1, h, w), k, stride=1, padding=radius, count_include_pad=True) * k * k
    return mass, cells.flatten() / (h * w)


def read_locality(model, clips, radius: int = 1, destroyed_share: float = 0.5) -> dict:
    """Window mass, its uniform share, lift and entropy of the reads of frames t >= T of ``clips`` (``(frames
    uint8 [F,H,W,3], labels, damage bool [F,H,W])``, e.g. :func:`~.ablation.eval_clips`), per region: a
    feature cell is ``destroyed`` when at least ``destroyed_share`` of its pixels were, ``intact`` when none."""
    import torch
    import torch.nn.functional as F
    T = model.config.memory_frames
    sums = {r: {"queries": 0, "window_mass": 0.0, "uniform_mass": 0.0, "entropy": 0.0} for r in REGIONS}
    positions = None
    model.eval()
    with torch.inference_mode():
        for frames, _, damage in clips:
            feats = model.backbone(model.normalize(torch.from_numpy(np.ascontiguousarray(frames))))[1]
            h, w = feats.shape[-2:]
            positions = T * h * w
            share = F.adaptive_avg_pool2d(torch.from_numpy(damage).float()[:, None], (h, w))[:, 0].flatten(1)
            for t in range(T, len(frames)):
                weights = frame_read_weights(model, feats, t)
                mass, uniform = window_mass(weights, radius)
                p = weights.flatten(1)
                entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(1)
                for region, sel in (("destroyed", share[t] >= destroyed_share), ("intact", share[t] == 0)):
                    s = sums[region]
                    s["queries"] += int(sel.sum())
                    s["window_mass"] += float(mass[sel].sum())
                    s["uniform_mass"] += float(uniform[sel].sum())
                    s["entropy"] += float(entropy[sel].sum())
    out = {"radius": radius, "memory_positions": positions,
           "max_entropy": None if positions is None else float(np.log(positions))}
    for region, s in sums.items():
        n = s["queries"]
        mean = {k: (s[k] / n if n else None) for k in ("window_mass", "uniform_mass", "entropy")}
        out[region] = {"queries": n, **mean,
                       "lift": mean["window_mass"] / mean["uniform_mass"] if n else None}
    return out


def format_locality(result: dict) -> str:
    r = result["radius"]
    lines = [f"| query cells | count | weight on the same place ({2 * r + 1}x{2 * r + 1} cells, all slots) "
             f"| uniform read | lift | entropy (nats, of {result['max_entropy']:.2f}) |", "|---|---|---|---|---|---|"]
    for region in REGIONS:
        x = result[region]
        if not x["queries"]:
            lines.append(f"| {region} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {region} | {x['queries']} | {100 * x['window_mass']:.2f} % | {100 * x['uniform_mass']:.2f} % "
                     f"| {x['lift']:.2f} | {x['entropy']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tmanet.training.read_locality", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a TMANet checkpoint (.pth)")
    p.add_argument("--clips", type=int, default=4, help="held-out synthetic clips")
    p.add_argument("--frames", type=int, default=6, help="frames per clip")
    p.add_argument("--size", default="256,512", help="clip size H,W")
    p.add_argument("--degradation", type=float, default=0.8)
    p.add_argument("--radius", type=int, default=1, help="the same place: cells within this distance")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    import torch

    from tmanet.checkpoints import CheckpointError, load_model
    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs, write_json

    from .ablation import eval_clips
    from .config import InputError, parse_pair
    try:
        if args.clips < 1 or args.radius < 0 or args.threads < 1:
            raise InputError("--clips and --threads must be >= 1 and --radius >= 0")
        if args.json:
            check_output(args.json, "file", "--json")
            refuse_overwriting_inputs([args.json], [args.checkpoint])
        torch.set_num_threads(args.threads)
        model = load_model(args.checkpoint)
        if args.frames <= model.config.memory_frames:
            raise InputError(f"clips need more than T={model.config.memory_frames} frames")
        clips = eval_clips(args.clips, parse_pair(args.size, "--size"), args.frames, args.degradation)
        result = {"checkpoint": args.checkpoint, "clips": args.clips, "size": list(parse_pair(args.size)),
                  "degradation": args.degradation, **read_locality(model, clips, args.radius)}
    except (InputError, UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_locality(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
