"""tmanet eval-compare: the mIoU difference of two eval results on the same clips and its paired-bootstrap
interval, checked on hand-made confusions and end to end on real evaluations."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tmanet.cli import main as cli_main
from tmanet.metrics import scores_from_confusion
from tmanet.training.eval_compare import ComparisonError, compare_evals, format_comparison
from tmanet.training.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def result(clips, degraded=None, memory="real", synthetic=None):
    """An eval result with these per-clip confusions (``degraded``: per clip, default a third of each)."""
    degraded = degraded if degraded is not None else [np.asarray(c) // 3 for c in clips]
    return {"source": f"model-{memory}", "memory_source": memory, "data": "synthetic:%d" % len(clips),
            "scored_frames": "t >= T (2)", "synthetic": synthetic or {"size": [64, 128], "degradation": 0.5},
            "per_clip": [{"seed": 1_000_000 + i, "confusion": np.asarray(c).tolist(),
                          "confusion_degraded": np.asarray(d).tolist()} for i, (c, d) in enumerate(zip(clips, degraded))]}


def confusion(correct, wrong):
    """Two classes: ``correct`` pixels on the diagonal and ``wrong`` off it, per class."""
    return np.array([[correct, wrong], [wrong, correct]], np.int64)


def miou(cm):
    return scores_from_confusion(cm)["miou"]


def test_difference_is_of_the_pooled_miou_and_the_interval_holds_it():
    rng = np.random.default_rng(3)
    a_clips = [confusion(c, w) for c, w in rng.integers(20, 90, size=(12, 2))]
    b_clips = [confusion(c, w) for c, w in rng.integers(10, 90, size=(12, 2))]
    c = compare_evals(result(a_clips), result(b_clips, memory="current"), region="all", samples=500)
    # pooled over clips, not the mean of the clips' mIoUs
    assert c["difference"] == pytest.approx(miou(sum(a_clips)) - miou(sum(b_clips)))
    assert c["difference"] != pytest.approx(np.mean([miou(x) - miou(y) for x, y in zip(a_clips, b_clips)]))
    lo, hi = c["interval95"]
    assert lo < c["difference"] < hi and hi - lo > 0.01
    per_clip = [miou(x) - miou(y) for x, y in zip(a_clips, b_clips)]
    assert (c["clips_a_better"], c["clips_b_better"]) == (sum(d > 0 for d in per_clip), sum(d < 0 for d in per_clip))
    assert c["clips"] == 12 and c["a"]["memory_source"] == "real" and c["b"]["memory_source"] == "current"
    # the same seed draws the same clips; another seed other ones
    assert compare_evals(result(a_clips), result(b_clips), region="all", samples=500)["interval95"] == [lo, hi]
    assert compare_evals(result(a_clips), result(b_clips), region="all", samples=500, seed=1)["interval95"] != [lo, hi]
    text = format_comparison(c)
    assert f"{100 * c['difference']:+.2f} points" in text and "12 clips" in text


def test_clips_that_agree_leave_no_doubt():
    """Every clip with the same confusion: every bootstrap draw pools the same proportions."""
    a, b = [confusion(80, 20)] * 6, [confusion(60, 40)] * 6
    c = compare_evals(result(a), result(b), region="all", samples=200)
    assert c["difference"] == pytest.approx(miou(confusion(80, 20)) - miou(confusion(60, 40)))
    assert c["interval95"] == pytest.approx([c["difference"]] * 2)
    same = compare_evals(result(a), result(a), region="all", samples=200)
    assert same["difference"] == 0 and same["interval95"] == [0, 0] and same["clips_a_better"] == 0


def test_regions_read_their_own_confusions():
    clips = [confusion(50 + i, 10) for i in range(4)]
    damaged = [confusion(5, 5 + i) for i in range(4)]
    other = [confusion(40, 10)] * 4
    a, b = result(clips, damaged), result(other, [confusion(5, 5)] * 4)
    deg = compare_evals(a, b, region="degraded", samples=50)
    assert deg["a"]["miou"] == pytest.approx(miou(sum(damaged)))
    intact = compare_evals(a, b, region="intact", samples=50)
    assert intact["a"]["miou"] == pytest.approx(miou(sum(clips) - sum(damaged)))
    assert intact["b"]["miou"] == pytest.approx(miou(4 * (confusion(40, 10) - confusion(5, 5))))


def test_clips_without_destroyed_pixels():
    zero = np.zeros((2, 2), np.int64)
    clean = result([confusion(5, 1)] * 3, [zero] * 3)
    with pytest.raises(ComparisonError, match="no degraded pixels"):
        compare_evals(clean, clean)
    # some clips with none: the pooled figures and every draw that has some still count
    a = result([confusion(50, 5)] * 3, [zero, confusion(8, 2), confusion(6, 4)])
    b = result([confusion(50, 5)] * 3, [zero, confusion(5, 5), confusion(4, 6)])
    c = compare_evals(a, b, samples=300)
    assert c["difference"] == pytest.approx(miou(confusion(14, 6)) - miou(confusion(9, 11)))
    assert c["clips_a_better"] == 2 and c["clips_b_better"] == 0
    assert np.isfinite(c["interval95"]).all() and c["interval95"][0] > 0


def test_refuses_results_on_other_clips():
    a = result([confusion(5, 1)] * 3)
    with pytest.raises(ComparisonError, match="not the same clips: 3 clips against 2"):
        compare_evals(a, {**result([confusion(5, 1)] * 2), "data": a["data"]})
    with pytest.raises(ComparisonError, match="synthetic settings"):
        compare_evals(a, result([confusion(5, 1)] * 3, synthetic={"size": [64, 128], "degradation": 0.9}))
    with pytest.raises(ComparisonError, match="no per-clip confusions"):
        compare_evals(a, {k: v for k, v in a.items() if k != "per_clip"})
    with pytest.raises(ComparisonError, match="region"):
        compare_evals(a, a, region="blurred")


def test_cli_compares_real_evaluations(tiny_ckpt, tmp_path, capsys):
    """Two real `tmanet eval --json` runs of the tiny model (real and current-frame memory) on 3 clips."""
    paths = {}
    for memory in ("real", "current"):
        paths[memory] = tmp_path / f"{memory}.json"
        assert cli_main(["eval", str(tiny_ckpt), "--data", "synthetic:3", "--synthetic-size", "64,128",
                         "--synthetic-frames", "4", "--synthetic-degradation", "0.9", "--memory-source", memory,
                         "--json", str(paths[memory]), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "diff.json"
    assert cli_main(["eval-compare", str(paths["real"]), str(paths["current"]), "--samples", "300",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    real, current = (json.loads(paths[m].read_text()) for m in ("real", "current"))
    assert saved["difference"] == pytest.approx(real["degraded"]["miou"] - current["degraded"]["miou"])
    assert saved["clips"] == 3 and saved["region"] == "degraded" and "3 clips" in printed
    lo, hi = saved["interval95"]
    assert lo <= saved["difference"] <= hi
    whole = compare_evals(real, current, region="all", samples=10)
    assert whole["difference"] == pytest.approx(real["miou"] - current["miou"])
    # an eval on other clips is refused in one line, and the output never overwrites an input
    other = tmp_path / "other.json"
    assert cli_main(["eval", str(tiny_ckpt), "--data", "synthetic:2", "--synthetic-size", "64,128",
                     "--synthetic-frames", "4", "--json", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["eval-compare", str(paths["real"]), str(other)]) != 0
    assert "not the same clips" in capsys.readouterr().err
    before = paths["real"].read_bytes()
    assert cli_main(["eval-compare", str(paths["real"]), str(paths["current"]), "--json", str(paths["real"])]) != 0
    assert paths["real"].read_bytes() == before


def test_evaluate_on_the_same_clips_compares_with_itself(tiny_ckpt):
    r = evaluate(tiny_ckpt, "synthetic:2", synthetic_size=(64, 128), synthetic_frames=4, progress=False)
    c = compare_evals(r, r, region="all", samples=20)
    assert c["difference"] == 0 and c["a"]["miou"] == pytest.approx(r["miou"])
