"""How much two ``tmanet eval`` results on the same synthetic clips differ,
and how sure that difference is.

mIoU pools a confusion matrix over all clips, so it is not a mean of per-clip figures and has no per-clip
standard error. The interval comes from a paired bootstrap over clips instead: draw the clips with replacement,
pool each result's confusions of the drawn clips, take the mIoU difference; the 2.5 and 97.5 percentiles of
those differences are the 95 % interval. Both results must score the same clips (same renderer settings and
seeds), which the per-clip seeds in each result prove.
"""
from __future__ import annotations

import numpy as np

from tmanet.metrics import scores_from_confusion

REGIONS = ("all", "degraded", "intact")


class ComparisonError(ValueError):
    """The two results cannot be compared clip by clip."""


def _clip_confusions(result: dict, region: str) -> np.ndarray:
    clips = result.get("per_clip")
    if not clips:
        raise ComparisonError(f"{result.get('source', 'a result')}: no per-clip confusions (only `tmanet eval` on "
                              "synthetic clips records them)")
    whole = np.asarray([c["confusion"] for c in clips], np.int64)
    degraded = np.asarray([c["confusion_degraded"] for c in clips], np.int64)
    return {"all": whole, "degraded": degraded, "intact": whole - degraded}[region]


def _check_same_clips(a: dict, b: dict) -> None:
    for k in ("data", "scored_frames"):
        if a.get(k) != b.get(k):
            raise ComparisonError(f"not the same clips: {k} {a.get(k)!r} against {b.get(k)!r}")
    if a.get("synthetic") != b.get("synthetic"):
        raise ComparisonError(f"not the same clips: synthetic settings {a.get('synthetic')} against "
                              f"{b.get('synthetic')}")
    seeds_a = [c["seed"] for c in a.get("per_clip") or []]
    seeds_b = [c["seed"] for c in b.get("per_clip") or []]
    if seeds_a != seeds_b:
        raise ComparisonError(f"not the same clips: {len(seeds_a)} clips against {len(seeds_b)} (seeds differ)")


def _miou(cm: np.ndarray) -> float:
    return scores_from_confusion(cm)["miou"]


def _difference(cm_a: np.ndarray, cm_b: np.ndarray) -> float:
    """mIoU of ``cm_a`` minus that of ``cm_b``; NaN where either has no pixels."""
    a, b = _miou(cm_a), _miou(cm_b)
    return float("nan") if a is None or b is None else a - b


def compare_evals(a: dict, b: dict, region: str = "degraded", samples: int = 2000, seed: int = 0) -> dict:
    """mIoU of ``a`` minus that of ``b`` on ``region`` (all / degraded / intact pixels) of their common clips,
    with a 95 % paired-bootstrap interval over clips (``samples`` draws, generator ``seed``) and the number of
    clips on which ``a`` scores higher."""
    if region not in REGIONS:
        raise ComparisonError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    if samples < 1:
        raise ComparisonError(f"samples must be >= 1, got {samples}")
    ca, cb = _clip_confusions(a, region), _clip_confusions(b, region)
    _check_same_clips(a, b)
    n = len(ca)
    miou_a, miou_b = _miou(ca.sum(0)), _miou(cb.sum(0))
    if miou_a is None or miou_b is None:
        raise ComparisonError(f"no {region} pixels in these clips (e.g. degradation 0 destroys none)")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    # a draw's pooled confusion is the sum of its clips' confusions: count how often each clip was drawn
    weights = np.stack([np.bincount(d, minlength=n) for d in draws])
    pooled_a = np.tensordot(weights, ca, axes=1)
    pooled_b = np.tensordot(weights, cb, axes=1)
    diffs = np.asarray([_difference(x, y) for x, y in zip(pooled_a, pooled_b)], np.float64)
    diffs = diffs[~np.isnan(diffs)]  # a draw of clips without pixels in the region scores nothing
    per_clip = [_difference(x, y) for x, y in zip(ca, cb)]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"region": region, "clips": n, "a": {"source": a.get("source"), "memory_source": a.get("memory_source"),
                                                "miou": miou_a},
            "b": {"source": b.get("source"), "memory_source": b.get("memory_source"), "miou": miou_b},
            "difference": miou_a - miou_b, "interval95": [float(lo), float(hi)], "samples": samples,
            "seed": seed, "clips_a_better": int(sum(d > 0 for d in per_clip)),
            "clips_b_better": int(sum(d < 0 for d in per_clip))}


def format_comparison(c: dict) -> str:
    def side(s):
        return f"{s['source']} (memory {s['memory_source']})"
    return (f"mIoU on {c['region']} pixels of {c['clips']} clips:\n"
            f"  A {100 * c['a']['miou']:6.2f}  {side(c['a'])}\n"
            f"  B {100 * c['b']['miou']:6.2f}  {side(c['b'])}\n"
            f"  A - B {100 * c['difference']:+.2f} points, 95 % interval {100 * c['interval95'][0]:+.2f} .. "
            f"{100 * c['interval95'][1]:+.2f} (paired bootstrap over clips, {c['samples']} draws); A higher on "
            f"{c['clips_a_better']} clips, B on {c['clips_b_better']}")
