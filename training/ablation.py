"""The paper's claim on our data: does temporal memory help, and does the memory order matter?

Each variant is the same network trained with :func:`tmanet.training.trainer.train` (same seed, same
synthetic training clips, same targets, same iterations) and scored on held-out degraded synthetic clips
(seeds disjoint from training) with the official protocol, ``model.forward(image, memory)`` in torch:

- ``single-frame``: the T=2 network with the current frame in every memory slot (same compute, no
  temporal information),
- ``T=1``, ``T=2 oldest-first`` (official), ``T=2 newest-first``, ``T=4 oldest-first``, ``T=4 newest-first``.

Every variant trains on the same target frames (t >= the largest T, so every memory is real) and is scored
on the same frames t >= ``score_from`` (default: the largest T), memory clamped to frame 0 at the clip
start. Scores: mIoU, pixel accuracy, accuracy and mIoU on the pixels the degradation destroyed (the
renderer's damage mask), temporal consistency, their spread over the evaluation clips and the per-clip difference to the
baseline. Each trained model is also scored with other memory at test time (:func:`cross_orders`): the
current frame (how much it relies on its memory) and the reversed order (what a wrong slot rule costs).

Why oldest- vs newest-first *training* is no test of the order itself: every slot has its own encoder and
the attention pools all T*h*w memory positions, so a newest-first network is an oldest-first network with
its slot encoders permuted: the same function class. Trained from scratch, the two differ only in which
random initial weights meet which frame, i.e. like two seeds. The order matters once weights exist: a
model must be run with the order it was trained with (the cross evaluation measures the cost).

Writes ``ablation.json`` (after every variant: a stopped run resumes, finished runs are reused) and
``ablation.md``.

    python -m tmanet.training.ablation --out runs/ablation --iters 500 --threads 1   # ~40 min on 2 shared cores
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmanet.safe_files import write_json, write_text

log = logging.getLogger("tmanet")

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"


@dataclass(frozen=True)
class Variant:
    name: str
    memory_frames: int
    memory_order: str  # one of config.MEMORY_ORDERS

    @property
    def slug(self) -> str:
        """Folder name of the variant's training run."""
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name.replace("=", "")).strip("-")


VARIANTS = {v.name: v for v in (
    Variant("single-frame", 2, "current"),
    Variant("T=1", 1, "oldest_first"),
    Variant("T=2 oldest-first", 2, "oldest_first"),
    Variant("T=2 newest-first", 2, "newest_first"),
    Variant("T=4 oldest-first", 4, "oldest_first"),
    Variant("T=4 newest-first", 4, "newest_first"),
)}
_SWAP = {"oldest_first": "newest_first", "newest_first": "oldest_first"}
DEFAULT_VARIANTS = tuple(VARIANTS)
_SPEC = re.compile(r"^T=(?P<t>\d+)(?:\s+(?P<order>oldest-first|newest-first|current))?$")


def parse_variant(v) -> Variant:
    """A :class:`Variant`, a name of :data:`VARIANTS`, or ``"T=<n> [oldest-first|newest-first|current]"``."""
    from .config import InputError
    if isinstance(v, Variant):
        return v
    text = " ".join(str(v).split())
    if text in VARIANTS:
        return VARIANTS[text]
    m = _SPEC.match(text)
    if not m or int(m["t"]) < 1:
        raise InputError(f"unknown ablation variant {v!r}: use one of {', '.join(VARIANTS)} or "
                         "'T=<n> oldest-first|newest-first|current'")
    return Variant(text, int(m["t"]), (m["order"] or "oldest-first").replace("-", "_"))


def small_config():
    """The ablation's model: a narrow ResNet-18 TMANet that trains in minutes on a CPU."""
    from tmanet.presets import get_preset
    return get_preset("cityscapes-r18").replace(base_channels=16, key_channels=16, value_channels=32,
                                                channels=48, aux_channels=24)


# -- evaluation ----------------------------------------------------------------------------------------
def eval_clips(count: int, size=(128, 256), frames: int = 12, degradation: float = 0.8):
    """Held-out clips (seeds from ``SYNTHETIC_VAL_SEED``, disjoint from training): a list of
    ``(frames uint8 [F,H,W,3], labels uint8 [F,H,W], corrupted bool [F,H,W])``, ``corrupted`` marking the
    pixels the degradation destroyed (the renderer's damage mask, as ``tmanet eval`` scores them)."""
    from .synthetic import ClipSpec, make_street_clip_with_damage
    from .data import SYNTHETIC_VAL_SEED
    return [make_street_clip_with_damage(ClipSpec(frames=frames, height=size[0], width=size[1],
                                                  degradation=degradation, seed=SYNTHETIC_VAL_SEED + i))
            for i in range(count)]


def predict_clip(model, frames, order: str, score_from: int, batch: int = 4) -> np.ndarray:
    """Masks uint8 ``[F - score_from, H, W]`` of frames ``score_from..F-1`` by the official protocol
    (``model.forward(image, memory)``), memory frames picked by ``order`` and clamped to frame 0."""
    import torch

    from .recipe import memory_frame_order
    T = model.config.memory_frames
    clip = torch.from_numpy(np.ascontiguousarray(frames))
    targets = list(range(score_from, len(frames)))
    masks = []
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(targets), batch):
            ts = targets[k:k + batch]
            index = torch.tensor([memory_frame_order(t, T, order) for t in ts])  # [b, T]
            logits = model(model.normalize(clip[ts]), model.normalize(clip[index]))
            masks.append(logits.argmax(1).to(torch.uint8).numpy())
    return np.concatenate(masks) if masks else np.zeros((0,) + frames.shape[1:3], np.uint8)


def _spread(values) -> dict:
    a = np.asarray([v for v in values if v is not None], np.float64)
    if not a.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def evaluate_variant(model, clips, order: str, score_from: int, batch: int = 4, progress: bool = False) -> dict:
    """Pooled and per-clip scores of ``model`` under memory ``order`` on ``clips`` (from :func:`eval_clips`)."""
    from tqdm import tqdm

    from tmanet.metrics import FlipCounter, confusion_matrix, region_scores, scores_from_confusion
    C = model.config.num_classes
    cm = np.zeros((C, C), np.int64)
    cm_bad = np.zeros((C, C), np.int64)
    flips = FlipCounter()
    bad_hit = bad_total = 0
    per_clip = []
    started = time.perf_counter()
    for frames, labels, corrupted in tqdm(clips, desc="evaluate", unit="clip", disable=not progress, leave=False):
        masks = predict_clip(model, frames, order, score_from, batch)
        gts, bad = labels[score_from:], corrupted[score_from:]
        clip_cm = confusion_matrix(masks, gts, C)
        clip_flips = FlipCounter()
        flips.start_clip()
        for m, g in zip(masks, gts):
            flips.add(m, g)
            clip_flips.add(m, g)
        hit = int((masks == gts)[bad].sum())
        cm_bad += confusion_matrix(masks[bad], gts[bad], C)
        bad_hit, bad_total = bad_hit + hit, bad_total + int(bad.sum())
        cm += clip_cm
        s = scores_from_confusion(clip_cm)
        per_clip.append({"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"],
                         "corrupted_accuracy": hit / int(bad.sum()) if bad.any() else None,
                         "temporal_consistency": clip_flips.result()["temporal_consistency"]})
    pooled = scores_from_confusion(cm, model.config.class_names)
    keys = ("miou", "pixel_accuracy", "corrupted_accuracy", "temporal_consistency")
    return {
        "miou": pooled["miou"], "pixel_accuracy": pooled["pixel_accuracy"],
        "mean_accuracy": pooled["mean_accuracy"],
        "corrupted_accuracy": bad_hit / bad_total if bad_total else None, "corrupted_pixels": bad_total,
        "degraded": region_scores(cm_bad),
        **flips.result(),
        "per_class_iou": {n: v["iou"] for n, v in pooled["per_class"].items() if v["iou"] is not None},
        "per_clip": per_clip, "spread": {k: _spread(c[k] for c in per_clip) for k in keys},
        "frames_scored": int(sum(len(f) - score_from for f, _, _ in clips)), "clips": len(clips),
        "seconds": round(time.perf_counter() - started, 2),
    }


def paired_difference(result: dict, baseline: dict, key: str = "miou") -> dict:
    """Per-clip ``result - baseline`` of ``key``: mean, standard deviation, standard error, clips won."""
    d = np.asarray([a[key] - b[key] for a, b in zip(result["per_clip"], baseline["per_clip"], strict=True)
                    if a[key] is not None and b[key] is not None], np.float64)
    if not d.size:
        return {"mean": None, "std": None, "sem": None, "wins": 0, "n": 0}
    std = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return {"mean": float(d.mean()), "std": std, "sem": std / np.sqrt(d.size), "wins": int((d > 0).sum()),
            "n": int(d.size)}


def cross_orders(v: Variant) -> list[str]:
    """Memory orders to score a trained variant with besides its own: "current" (its memory taken away:
    how much it relies on it) and, for T >= 2, the reversed order (weights trained on one order, run on
    the other: what a runtime with the wrong slot rule gives). A single-frame model gets real memory."""
    if v.memory_order == "current":
        return ["oldest_first"]
    return ["current"] + ([_SWAP[v.memory_order]] if v.memory_frames >= 2 else [])


# -- the experiment ------------------------------------------------------------------------------------
def run_ablation(out_dir, variants=DEFAULT_VARIANTS, iters: int = 500, batch: int = 2, crop=(128, 256),
                 degradation: float = 0.8, eval_clip_count: int = 24, train_clips: int = 48,
                 clip_size=(128, 256), clip_frames: int = 12, config=None, lr: float = 0.01, seed: int = 0,
                 workers: int = 1, score_from: int | None = None, train_from: int | None = None,
                 eval_batch: int = 4, damage_weight: float = 1.0,
                 baseline: str | None = None, cross: bool = True, progress: bool = True) -> dict:
    """Train and score every variant (see the module doc) into ``out_dir``: one training folder per variant
    (``out_dir/<slug>/``: a stopped run resumes from its ``latest.pth``, a finished one is reused),
    ``ablation.json`` and ``ablation.md``. ``config`` defaults to :func:`small_config` (its
    ``memory_frames`` is set per variant). ``baseline`` (default: ``single-frame`` when present, else the
    first variant) is what the per-clip differences compare against. ``cross`` also scores every trained
    variant under the memory orders of :func:`cross_orders`. ``train_from`` is the first training target
    frame (default: the largest T; give the same value to compare runs with other variant sets).
    ``damage_weight`` weights the destroyed pixels in the training loss (:func:`~.recipe.damage_weights`).
    Returns the ablation.json dict."""
    from tmanet.checkpoints import load_model

    from .config import InputError, check_memory_order, parse_pair
    from .trainer import LATEST, MODEL, train
    variants = [parse_variant(v) for v in variants]
    if not variants:
        raise InputError("no ablation variants given")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InputError(f"duplicate ablation variants in {names}")
    for v in variants:
        check_memory_order(v.memory_order)
    clip_size, crop = parse_pair(clip_size, "clip size"), parse_pair(crop, "crop")
    max_t = max(v.memory_frames for v in variants)
    score_from = max_t if score_from is None else int(score_from)
    if score_from < max_t:
        raise InputError(f"score_from ({score_from}) must be >= the largest T ({max_t}): every variant must see "
                         "a full memory on every scored frame")
    train_from = max_t if train_from is None else int(train_from)
    if train_from < max_t:
        raise InputError(f"train_from ({train_from}) must be >= the largest T ({max_t}): a full memory for "
                         "every training target")
    if clip_frames <= max(score_from, train_from):
        raise InputError(f"clips of {clip_frames} frames leave nothing to train on or score from frame "
                         f"{max(score_from, train_from)}")
    if not 0.0 <= float(degradation) <= 1.0:
        raise InputError(f"degradation must lie in [0, 1], got {degradation}")
    if eval_clip_count < 1 or train_clips < 1:
        raise InputError(f"eval and train clip counts must be >= 1, got {eval_clip_count}, {train_clips}")
    if baseline is None:
        baseline = "single-frame" if "single-frame" in names else names[0]
    if baseline not in names:
        raise InputError(f"baseline {baseline!r} is not one of the variants {names}")
    config = config if config is not None else small_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"iters": iters, "batch": batch, "crop": list(crop), "degradation": degradation,
                "train_clips": train_clips, "eval_clips": eval_clip_count, "clip_size": list(clip_size),
                "clip_frames": clip_frames, "train_targets_from": train_from, "score_from": score_from, "lr": lr,
                "seed": seed, "workers": workers, "baseline": baseline, "config": config.to_dict(),
                "damage_weight": float(damage_weight),
                "corrupted": "the renderer's damage mask"}
    started = time.perf_counter()
    log.info("rendering %d held-out evaluation clips", eval_clip_count)
    clips = eval_clips(eval_clip_count, clip_size, clip_frames, degradation)
    result = {"settings": settings, "variants": []}
    for k, v in enumerate(variants):
        run_dir = out / v.slug
        log.info("variant %d/%d %s: T=%d, memory %s -> %s", k + 1, len(variants), v.name, v.memory_frames,
                 v.memory_order, run_dir)
        vconfig = config.replace(memory_frames=v.memory_frames)
        wanted = {"data": f"synthetic:{train_clips}", "iters": iters, "batch": batch, "lr": lr, "crop": list(crop),
                  "seed": seed, "synthetic_size": list(clip_size), "synthetic_frames": clip_frames,
                  "memory_order": v.memory_order, "synthetic_degradation": degradation,
                  "synthetic_first_target": train_from, "damage_weight": float(damage_weight)}
        summary = _finished_run(run_dir, vconfig, wanted)
        if summary is None:
            summary = train(vconfig, wanted["data"], run_dir, iters=iters, batch=batch, lr=lr,
                            resume=(run_dir / LATEST).is_file(), crop=crop, workers=workers, seed=seed,
                            log_every=10, checkpoint_every=max(iters // 4, 1), keep_every=None,
                            synthetic_size=clip_size, synthetic_frames=clip_frames, progress=progress,
                            memory_order=v.memory_order, synthetic_degradation=degradation,
                            synthetic_first_target=train_from, damage_weight=damage_weight)
        else:
            log.info("%s: reusing the finished run in %s", v.name, run_dir)
        model = load_model(run_dir / MODEL)
        scores = evaluate_variant(model, clips, v.memory_order, score_from, eval_batch, progress)
        other = {}
        for order in (cross_orders(v) if cross else []):
            other[order] = evaluate_variant(model, clips, order, score_from, eval_batch, progress)
            log.info("%s evaluated with %s memory: mIoU %.4f", v.name, order, other[order]["miou"])
        last = _last_log(run_dir)
        result["variants"].append({
            "name": v.name, "sequence_num": v.memory_frames, "memory_order": v.memory_order, "run": str(run_dir),
            "train": {"seconds": round(summary["seconds"] + sum(h.get("seconds", 0) for h in _history(run_dir)), 1),
                      "steady_iters_per_second": summary["steady_iters_per_second"],
                      "iters": summary["end_iter"], "samples": summary["samples"],
                      "final_loss": last.get("loss"), "final_decode_loss": last.get("decode_loss")},
            "eval": scores, "cross_eval": other})
        log.info("%s: mIoU %.4f, pixel acc %.4f, corrupted-pixel acc %.4f, temporal consistency %.4f", v.name,
                 scores["miou"], scores["pixel_accuracy"], scores["corrupted_accuracy"] or float("nan"),
                 scores["temporal_consistency"] or float("nan"))
        _write(out, result, baseline, started)
    return _write(out, result, baseline, started, final=True)


def _finished_run(run_dir: Path, config, wanted: dict) -> dict | None:
    """The log.json summary of a finished training run in ``run_dir`` made with ``config`` and the
    ``wanted`` settings (None when there is no such run yet: train or resume it). A run with other
    settings is an error: reusing it would mix experiments."""
    from tmanet.checkpoints import read_checkpoint
    from tmanet.presets import ModelConfig

    from .config import InputError
    from .trainer import LATEST, MODEL
    path = run_dir / MODEL if (run_dir / MODEL).is_file() else run_dir / LATEST
    if not path.is_file():
        return None
    ckpt = read_checkpoint(path)
    meta = ckpt.get("meta", {})
    defaults = {"damage_weight": 1.0}  # runs from before the setting existed
    diff = [k for k, v in wanted.items() if k != "iters" and meta.get(k, defaults.get(k)) != v]
    if ModelConfig.from_dict(ckpt["config"]) != config:
        diff.append("config")
    if diff:
        raise InputError(f"{run_dir} holds a run with other settings ({', '.join(diff)}): use another --out")
    try:
        summary = json.loads((run_dir / "log.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    done = path.name == MODEL and summary.get("finished") and summary.get("end_iter") == wanted["iters"]
    return summary if done else None


def _last_log(run_dir: Path) -> dict:
    """The last log.csv row of a run as floats (the mean losses of its last logging window)."""
    import csv
    try:
        with open(run_dir / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    return {k: float(v) for k, v in rows[-1].items() if v not in (None, "")} if rows else {}


def _history(run_dir: Path) -> list:
    """Earlier invocations of a resumed training run (their seconds count toward its training time)."""
    try:
        return json.loads((run_dir / "log.json").read_text()).get("history", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def _write(out: Path, result: dict, baseline: str, started: float, final: bool = False) -> dict:
    base = next((r for r in result["variants"] if r["name"] == baseline), None)
    keys = ("miou", "pixel_accuracy", "corrupted_accuracy")
    for r in result["variants"]:
        if base is not None and r is not base:
            r["vs_baseline"] = {k: paired_difference(r["eval"], base["eval"], k) for k in keys}
        for scores in r.get("cross_eval", {}).values():
            scores["vs_own_order"] = {k: paired_difference(scores, r["eval"], k) for k in keys}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["complete"] = final
    write_json(out / ABLATION_JSON, result)
    write_text(out / ABLATION_MD, format_table(result) + "\n")
    return result


def _pct(x, digits=1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _delta(d) -> str:
    if d is None or d["mean"] is None:
        return "–"
    return f"{100 * d['mean']:+.2f} ± {100 * d['sem']:.2f} ({d['wins']}/{d['n']})"


def format_table(result: dict) -> str:
    """The Markdown table of an ablation result (scores in %)."""
    s = result["settings"]
    base = s["baseline"]
    weight = s.get("damage_weight", 1.0)
    weighting = "" if weight == 1.0 else f", destroyed pixels weighted {weight:g}x in the loss"
    lines = [
        f"Trained {s['iters']} iterations each (batch {s['batch']}, crop {s['crop'][0]}x{s['crop'][1]}, seed "
        f"{s['seed']}, {s['train_clips']} training clips, targets t >= {s['train_targets_from']}{weighting}); scored on "
        f"{s['eval_clips']} held-out clips of {s['clip_frames']} frames at {s['clip_size'][0]}x{s['clip_size'][1]}, "
        f"degradation {s['degradation']}, frames t >= {s['score_from']}. Scores in %; ± is the standard deviation "
        f"over clips, Δ the mean per-clip difference to {base} ± its standard error (clips better / all).",
        "",
        "| variant | T | memory order | mIoU | pixel acc. | acc. on corrupted pixels | mIoU on corrupted pixels "
        "| temporal consistency | mIoU per clip (mean ± sd) | Δ mIoU vs baseline | Δ corrupted acc. vs baseline "
        "| train loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        e = r["eval"]
        sp = e["spread"]["miou"]
        per_clip = "–" if sp["mean"] is None else f"{_pct(sp['mean'])} ± {_pct(sp['std'])}"
        deltas = ["(baseline)"] * 2 if r["name"] == base else \
            [_delta(r.get("vs_baseline", {}).get(k)) for k in ("miou", "corrupted_accuracy")]
        loss = r["train"]["final_loss"]
        lines.append(f"| {r['name']} | {r['sequence_num']} | {r['memory_order'].replace('_', '-')} "
                     f"| {_pct(e['miou'])} | {_pct(e['pixel_accuracy'])} | {_pct(e['corrupted_accuracy'])} "
                     f"| {_pct(e.get('degraded', {}).get('miou'))} "
                     f"| {_pct(e['temporal_consistency'])} | {per_clip} | {deltas[0]} | {deltas[1]} "
                     f"| {'–' if loss is None else f'{loss:.3f}'} |")
    cross = [(r, order, e) for r in result["variants"] for order, e in r.get("cross_eval", {}).items()]
    if cross:
        lines += [
            "",
            "The same trained weights scored with other memory at test time (Δ: per-clip difference to the "
            "variant's own order ± standard error, clips better / all):",
            "",
            "| trained as | evaluated with memory | mIoU | pixel acc. | acc. on corrupted pixels "
            "| temporal consistency | Δ mIoU vs own order | Δ corrupted acc. vs own order |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r, order, e in cross:
            own = e.get("vs_own_order", {})
            lines.append(f"| {r['name']} | {order.replace('_', '-')} | {_pct(e['miou'])} "
                         f"| {_pct(e['pixel_accuracy'])} | {_pct(e['corrupted_accuracy'])} "
                         f"| {_pct(e['temporal_consistency'])} | {_delta(own.get('miou'))} "
                         f"| {_delta(own.get('corrupted_accuracy'))} |")
    if not result.get("complete", True):
        lines.append("")
        lines.append("(incomplete: the run is still going or was stopped)")
    return "\n".join(lines)


# -- several seeds -------------------------------------------------------------------------------------
SEEDS_JSON, SEEDS_MD = "seeds.json", "seeds.md"


def run_ablation_seeds(out_dir, seeds, **kwargs) -> dict:
    """:func:`run_ablation` once per seed into ``out_dir/seed-<s>/`` (each resumable on its own), then the
    spread over seeds (:func:`summarise_seeds`) in ``seeds.json`` and ``seeds.md``. Returns the summary."""
    from .config import InputError
    seeds = [int(x) for x in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"give distinct seeds, got {seeds}")
    out = Path(out_dir)
    runs = {seed: run_ablation(out / f"seed-{seed}", seed=seed, **kwargs) for seed in seeds}
    summary = summarise_seeds(runs)
    write_json(out / SEEDS_JSON, summary)
    write_text(out / SEEDS_MD, format_seed_table(summary) + "\n")
    return summary


def summarise_seeds(runs: dict) -> dict:
    """Per variant, the spread over seeds (:func:`_spread`: mean, sd, min, max, n) of overall mIoU, mIoU and
    accuracy on the destroyed pixels, the destroyed-pixel mIoU with the current frame as memory, and the
    per-seed differences to the baseline (same seed) and to current-frame memory (same weights)."""
    first = next(iter(runs.values()))
    baseline = first["settings"]["baseline"]
    by_name = {seed: {v["name"]: v for v in result["variants"]} for seed, result in runs.items()}
    rows = []
    for name in (v["name"] for v in first["variants"]):
        per_seed = {}
        for seed, variants in by_name.items():
            r, base = variants.get(name), variants.get(baseline)
            if r is None:
                continue
            e, cur = r["eval"], r.get("cross_eval", {}).get("current")
            per_seed[seed] = {
                "miou": e["miou"], "destroyed_miou": e["degraded"]["miou"],
                "destroyed_accuracy": e["degraded"]["pixel_accuracy"],
                "destroyed_miou_current_memory": None if cur is None else cur["degraded"]["miou"],
                "destroyed_miou_minus_baseline": None if base is None else
                e["degraded"]["miou"] - base["eval"]["degraded"]["miou"],
                "destroyed_miou_minus_current_memory": None if cur is None else
                e["degraded"]["miou"] - cur["degraded"]["miou"]}
        keys = next(iter(per_seed.values())).keys() if per_seed else ()
        rows.append({"name": name, "per_seed": per_seed,
                     "spread": {k: _spread(v[k] for v in per_seed.values()) for k in keys}})
    return {"seeds": list(runs), "baseline": baseline, "settings": {k: v for k, v in first["settings"].items()
                                                                    if k != "seed"}, "variants": rows}


def _mean_sd(sp: dict, signed: bool = False) -> str:
    if sp is None or sp["mean"] is None:
        return "–"
    sign = "+" if signed else ""
    return f"{100 * sp['mean']:{sign}.1f} ± {100 * sp['std']:.1f}"


def format_seed_table(summary: dict) -> str:
    """The Markdown table of :func:`summarise_seeds` (scores in %, mean ± sd over seeds)."""
    seeds = ", ".join(str(x) for x in summary["seeds"])
    lines = [f"Mean ± standard deviation over seeds {seeds} (scores in %; destroyed: the pixels the degradation "
             f"destroyed; Δ per seed, then averaged).", "",
             "| variant | mIoU | mIoU destroyed | acc. destroyed | Δ mIoU destroyed vs " f"{summary['baseline']} "
             "| mIoU destroyed, current frame as memory | Δ real − current memory (destroyed) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["variants"]:
        sp = r["spread"]
        base = "(baseline)" if r["name"] == summary["baseline"] else \
            _mean_sd(sp.get("destroyed_miou_minus_baseline"), True)
        lines.append(f"| {r['name']} | {_mean_sd(sp.get('miou'))} | {_mean_sd(sp.get('destroyed_miou'))} "
                     f"| {_mean_sd(sp.get('destroyed_accuracy'))} | {base} "
                     f"| {_mean_sd(sp.get('destroyed_miou_current_memory'))} "
                     f"| {_mean_sd(sp.get('destroyed_miou_minus_current_memory'), True)} |")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tmanet.training.ablation",
        description="Single-frame baseline vs TMANet with T=1/2/4 and oldest-/newest-first memory, trained and "
                    "scored on degraded synthetic clips. A stopped run continues where it was (same --out).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (one training run per variant, ablation.json/.md)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help="variants: names as listed, or 'T=<n> oldest-first|newest-first|current'")
    p.add_argument("--iters", type=int, default=500, help="training iterations per variant")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--crop", default="128,256", help="training crop H,W")
    p.add_argument("--clip-size", default="128,256", help="synthetic clip size H,W")
    p.add_argument("--frames", type=int, default=12, help="frames per synthetic clip")
    p.add_argument("--degradation", type=float, default=0.8, help="per-frame degradation 0..1")
    p.add_argument("--train-clips", type=int, default=48)
    p.add_argument("--eval-clips", type=int, default=24)
    p.add_argument("--score-from", type=int, help="first scored frame (default: the largest T)")
    p.add_argument("--train-from", type=int, help="first training target frame (default: the largest T)")
    p.add_argument("--eval-batch", type=int, default=4, help="frames per forward pass in evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+",
                   help="several seeds: one ablation per seed in OUT/seed-<s>/, their spread in OUT/seeds.md")
    p.add_argument("--damage-weight", type=float, default=1.0,
                   help="loss weight of the pixels the degradation destroyed (1: plain cross-entropy)")
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--config-override", nargs="+", metavar="KEY=VALUE", default=[],
                   help="change fields of the small ResNet-18 config (JSON values)")
    p.add_argument("--no-cross", action="store_true",
                   help="score each variant with its own memory order only (no current / reversed memory)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from .config import InputError, resolve_config
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise InputError(f"--threads must be >= 1, got {args.threads}")
            import torch
            torch.set_num_threads(args.threads)
        config, _ = resolve_config(small_config(), args.config_override)
        settings = dict(variants=args.variants, iters=args.iters, batch=args.batch, crop=args.crop,
                        degradation=args.degradation, eval_clip_count=args.eval_clips,
                        train_clips=args.train_clips, clip_size=args.clip_size, clip_frames=args.frames,
                        config=config, lr=args.lr, workers=args.workers, score_from=args.score_from,
                        train_from=args.train_from, eval_batch=args.eval_batch, damage_weight=args.damage_weight,
                        cross=not args.no_cross, progress=not args.no_progress)
        if args.seeds:
            summary = run_ablation_seeds(args.out, args.seeds, **settings)
            print(format_seed_table(summary))
            print(f"wrote {Path(args.out) / SEEDS_JSON} and {Path(args.out) / SEEDS_MD}")
            return 0
        result = run_ablation(args.out, seed=args.seed, **settings)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {Path(args.out) / ABLATION_JSON} and {Path(args.out) / ABLATION_MD} "
          f"({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
