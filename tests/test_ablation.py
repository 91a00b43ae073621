"""The memory-order ablation: the slot rule per order (with warm-up clamping), "current" memory equal to the
frame in training and evaluation, the evaluation path against the model's own reference, and a tiny
end-to-end ablation (2 variants, 2 iterations) that writes the table, then resumes without retraining."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tmanet.checkpoints import read_checkpoint
from tmanet.model import TMANet
from tmanet.slots import memory_frame_indices
from tmanet.training.ablation import (DEFAULT_VARIANTS, VARIANTS, Variant, cross_orders, eval_clips,
                                      evaluate_variant, main, parse_variant, predict_clip, run_ablation,
                                      small_config)
from tmanet.training.synthetic import ClipSpec, make_street_clip
from tmanet.training.config import MEMORY_ORDERS, InputError, check_memory_order
from tmanet.training.data import SyntheticVideo, TrainSamples
from tmanet.training.recipe import init_from_scratch, memory_frame_order, order_memory
from tmanet.training.trainer import train

TINY = dict(base_channels=16, key_channels=16, value_channels=32, channels=32, aux_channels=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(T: int, seed: int = 0) -> TMANet:
    torch.manual_seed(seed)
    model = init_from_scratch(TMANet(small_config().replace(memory_frames=T, **TINY)))
    for m in model.modules():  # random BN statistics: a from-scratch BN is the identity, which hides mix-ups
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(model.decode_head.conv_seg.weight, 0, 0.3)  # class scores that differ visibly
    return model.eval()


# -- the memory-order rule -----------------------------------------------------------------------------
def test_memory_frame_order_per_order_and_clamping():
    assert memory_frame_order(5, 3, "oldest_first") == [2, 3, 4]
    assert memory_frame_order(5, 3, "newest_first") == [4, 3, 2]
    assert memory_frame_order(5, 3, "current") == [5, 5, 5]
    # warm-up: indices before the clip start clamp to it, in both orders
    assert memory_frame_order(2, 4, "oldest_first") == [0, 0, 0, 1]
    assert memory_frame_order(2, 4, "newest_first") == [1, 0, 0, 0]
    assert memory_frame_order(0, 2, "newest_first") == [0, 0]
    assert memory_frame_order(4, 3, "oldest_first", start=3) == [3, 3, 3]
    assert memory_frame_order(4, 3, "newest_first", start=2) == [3, 2, 2]
    assert memory_frame_order(4, 1, "newest-first") == [3]  # hyphens accepted
    for T in (1, 2, 4):
        for start in (0, 3):
            for t in range(start, start + 8):
                oldest = memory_frame_order(t, T, "oldest_first", start)
                assert oldest == memory_frame_indices(t, start, T)  # the runtime's (official) rule
                assert memory_frame_order(t, T, "newest_first", start) == oldest[::-1]
    with pytest.raises(InputError, match="memory order must be one of"):
        memory_frame_order(3, 2, "random")
    with pytest.raises(ValueError, match="precedes"):
        memory_frame_order(1, 2, "oldest_first", start=2)


def test_order_memory_numpy_and_torch():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    memory = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # frames t-3, t-2, t-1
    assert order_memory(image, memory, "oldest_first") is memory
    np.testing.assert_array_equal(order_memory(image, memory, "newest_first"), memory[[2, 1, 0]])
    cur = order_memory(image, memory, "current")
    assert cur.shape == memory.shape
    for k in range(3):
        np.testing.assert_array_equal(cur[k], image)
    ti, tm = torch.from_numpy(image), torch.from_numpy(memory)
    assert torch.equal(order_memory(ti, tm, "newest_first"), tm[[2, 1, 0]])
    tc = order_memory(ti, tm, "current")
    assert tc.shape == tm.shape and all(torch.equal(tc[k], ti) for k in range(3))
    tc[0, 0, 0, 0] ^= 1  # a real copy, not a view of the frame
    assert not torch.equal(tc[0], ti)
    assert set(MEMORY_ORDERS) == {"oldest_first", "newest_first", "current"}
    with pytest.raises(InputError):
        check_memory_order("oldest")


def test_training_samples_follow_the_memory_order():
    from tmanet.training.datasets import TrainTransform
    cfg = small_config().replace(memory_frames=2)
    transform = TrainTransform((32, 48), seed=0)
    ds = SyntheticVideo(1, 2, size=(32, 64), frames=5, degradation=0.8, transform=transform, first_target=3)
    assert [t for _, t in ds.samples] == [3, 4]  # a common first target: the same targets for any T <= 3
    frames, _ = ds.clips[0]
    plain = TrainSamples(ds, cfg.num_classes)[(0, 1)]
    # without a transform the memory is exactly frames 2, 3 of the clip (target 4), oldest first
    raw = SyntheticVideo(1, 2, size=(32, 64), frames=5, degradation=0.8, first_target=3)
    np.testing.assert_array_equal(TrainSamples(raw, cfg.num_classes)[(0, 1)]["memory"].numpy(), frames[[2, 3]])
    np.testing.assert_array_equal(TrainSamples(raw, cfg.num_classes, "newest_first")[(0, 1)]["memory"].numpy(),
                                  frames[[3, 2]])
    # with the random crop/flip: same geometry, so "current" memory is the transformed frame itself
    cur = TrainSamples(ds, cfg.num_classes, "current")[(0, 1)]
    assert torch.equal(cur["image"], plain["image"]) and torch.equal(cur["label"], plain["label"])
    assert all(torch.equal(cur["memory"][k], cur["image"]) for k in range(2))
    assert not torch.equal(plain["memory"][1], plain["image"])  # the real memory is another frame
    newest = TrainSamples(ds, cfg.num_classes, "newest_first")[(0, 1)]
    assert torch.equal(newest["memory"], plain["memory"].flip(0))
    with pytest.raises(InputError, match="first synthetic target"):
        SyntheticVideo(1, 2, size=(32, 64), frames=5, first_target=1)


def test_the_damage_map_moves_with_the_label():
    """The target frame's damage map goes through the crop/flip/resize of its label, nearest, padding intact."""
    from tmanet.training.datasets import TrainTransform
    cfg = small_config().replace(memory_frames=2)
    raw = SyntheticVideo(2, 2, size=(32, 64), frames=5, degradation=1.0, first_target=3)
    plain = raw[1]
    np.testing.assert_array_equal(plain["damage"], raw.damage[0][4])  # sample 1: clip 0, target frame 4
    assert plain["damage"].any() and not plain["damage"].all()
    transform = TrainTransform((40, 48), ratio_range=(0.5, 2.0), seed=0)
    ds = SyntheticVideo(2, 2, size=(32, 64), frames=5, degradation=1.0, transform=transform, first_target=3)
    for index in range(len(ds)):
        s = ds[index]
        c, t = ds.samples[index]
        # the same geometry applied to the damage map as a label: equal wherever the label is not padding
        rng = np.random.default_rng([ds.seed, ds.epoch, index, 1])
        frames, _ = ds.clips[c]
        _, _, moved = transform(frames[t], frames[t - 2:t], ds.damage[c][t].astype(np.uint8), rng=rng)
        inside = moved != 255
        np.testing.assert_array_equal(s["damage"][inside], moved[inside].astype(bool))
        assert not s["damage"][~inside].any()
        assert s["damage"].shape == s["label"].shape == (40, 48)
    sample = TrainSamples(ds, cfg.num_classes, "current")[(0, 1)]
    assert sample["damage"].dtype == torch.bool and torch.equal(sample["damage"], torch.from_numpy(ds[1]["damage"]))


def test_train_rejects_a_bad_memory_order_before_writing(tmp_path):
    with pytest.raises(InputError, match="memory order"):
        train("cityscapes-r18", "synthetic:1", tmp_path / "run", iters=1, batch=1, memory_order="sideways")
    with pytest.raises(InputError, match="degradation"):
        train("cityscapes-r18", "synthetic:1", tmp_path / "run", iters=1, batch=1, synthetic_degradation=1.5)
    assert not (tmp_path / "run").exists()


def test_memory_order_cli_flag_and_resume_keeps_the_order(tmp_path, capsys):
    from tmanet.cli import main as cli_main
    out = tmp_path / "run"
    argv = ["train", "--preset", "cityscapes-r18", "--config-override", *[f"{k}={v}" for k, v in TINY.items()],
            "--data", "synthetic:1", "--iters", "2", "--stop-after", "1", "--batch", "1", "--crop", "32,32",
            "--workers", "0", "--out", str(out), "--synthetic-size", "32,64", "--synthetic-frames", "4",
            "--synthetic-degradation", "0.9", "--memory-order", "current", "--damage-weight", "3", "--no-progress"]
    assert cli_main(argv) == 0
    meta = read_checkpoint(out / "latest.pth")["meta"]
    assert meta["memory_order"] == "current" and meta["synthetic_degradation"] == 0.9
    assert meta["damage_weight"] == 3.0
    summary = train(None, "synthetic:1", out, iters=2, batch=1, resume=True, workers=0, synthetic_size=(32, 64),
                    synthetic_frames=4, progress=False)  # no order given: the run's own
    assert summary["memory_order"] == "current" and summary["end_iter"] == 2
    assert read_checkpoint(out / "latest.pth")["meta"]["damage_weight"] == 3.0  # the run's own weight
    assert read_checkpoint(out / "model.pth")["meta"]["memory_order"] == "current"
    with pytest.raises(SystemExit):  # argparse refuses an unknown order before anything runs
        cli_main(argv[:-3] + ["--memory-order", "sideways"])
    assert "invalid choice" in capsys.readouterr().err


# -- evaluation path -----------------------------------------------------------------------------------
def test_predict_clip_uses_the_order_and_matches_the_reference():
    model = tiny_model(2)
    frames, _ = make_street_clip(ClipSpec(frames=6, height=32, width=64, degradation=0.8, seed=7))
    # oldest first = the model's own reference inference (official order) from frame T on
    ref = model.predict_clip(frames).argmax(1)
    np.testing.assert_array_equal(predict_clip(model, frames, "oldest_first", 2, batch=3), ref)
    # current: every slot holds the frame itself
    with torch.inference_mode():
        x = model.normalize(torch.from_numpy(frames[4:5]))
        cur = model(x, torch.stack([x, x], 1)).argmax(1).numpy()
        newest = model(x, model.normalize(torch.from_numpy(frames[[3, 2]]))[None]).argmax(1).numpy()
    np.testing.assert_array_equal(predict_clip(model, frames, "current", 4)[0], cur[0])
    np.testing.assert_array_equal(predict_clip(model, frames, "newest_first", 4)[0], newest[0])
    # the order changes the prediction (slot weights differ): the rule is not a no-op
    assert not np.array_equal(predict_clip(model, frames, "current", 2), ref)
    # frames before T clamp to frame 0 instead of failing
    assert predict_clip(model, frames, "newest_first", 0).shape == (6, 32, 64)


def test_newest_first_is_oldest_first_with_the_slot_encoders_permuted():
    """Why training oldest- vs newest-first compares two inits, not two orders: per-slot encoders + attention
    over all memory positions make the reversed order exactly the official order with slots relabelled."""
    import copy
    model = tiny_model(3, seed=1)
    swapped = copy.deepcopy(model)
    for enc in (swapped.decode_head.memory_key_conv, swapped.decode_head.memory_value_conv):
        for slots in enc:  # the 1x1 and the 3x3 SequenceConv
            mods = list(slots)[::-1]
            for i, m in enumerate(mods):
                slots[i] = m
    frames, _ = make_street_clip(ClipSpec(frames=6, height=32, width=64, degradation=0.8, seed=3))
    clip = torch.from_numpy(frames)

    def logits(m, order):
        idx = torch.tensor([memory_frame_order(t, 3, order) for t in (3, 4, 5)])
        with torch.inference_mode():
            return m(m.normalize(clip[[3, 4, 5]]), m.normalize(clip[idx]))
    same = logits(swapped, "oldest_first")
    torch.testing.assert_close(logits(model, "newest_first"), same, rtol=1e-4, atol=1e-4)
    assert (logits(model, "oldest_first") - same).abs().max() > 1e-2  # without the relabelling they differ


def test_evaluate_variant_scores_and_spread():
    model = tiny_model(1)
    clips = eval_clips(2, (32, 64), 5, 0.8)
    assert all(c[0].shape == (5, 32, 64, 3) and c[2].dtype == bool for c in clips)
    assert any(c[2].any() for c in clips)  # strong degradation corrupts pixels
    r = evaluate_variant(model, clips, "oldest_first", 1)
    assert r["clips"] == 2 and r["frames_scored"] == 8 and len(r["per_clip"]) == 2
    assert 0.0 <= r["miou"] <= r["pixel_accuracy"] + 1.0 and 0.0 <= r["temporal_consistency"] <= 1.0
    assert r["frame_pairs"] == 6  # 3 consecutive pairs per clip, none across clips
    sp = r["spread"]["pixel_accuracy"]
    accs = [c["pixel_accuracy"] for c in r["per_clip"]]
    assert sp["mean"] == pytest.approx(np.mean(accs)) and sp["std"] == pytest.approx(np.std(accs, ddof=1))
    # pooled pixel accuracy from the confusion matrix = the pixel-count weighted clip accuracies (equal sizes)
    assert r["pixel_accuracy"] == pytest.approx(np.mean(accs))
    # the destroyed pixels are the renderer's damage mask; their scores come from those pixels alone
    from tmanet.training.ablation import predict_clip
    from tmanet.metrics import confusion_matrix, region_scores
    from tmanet.training.synthetic import make_street_clip_with_damage
    from tmanet.training.data import SYNTHETIC_VAL_SEED
    cm = np.zeros((19, 19), np.int64)
    for i, (frames, labels, damage) in enumerate(clips):
        rendered = make_street_clip_with_damage(ClipSpec(frames=5, height=32, width=64, degradation=0.8,
                                                  seed=SYNTHETIC_VAL_SEED + i))
        assert all(np.array_equal(a, b) for a, b in zip(rendered, (frames, labels, damage)))
        masks = predict_clip(model, frames, "oldest_first", 1)
        cm += confusion_matrix(masks[damage[1:]], labels[1:][damage[1:]], 19)
    assert r["degraded"] == region_scores(cm) and r["degraded"]["pixels"] == r["corrupted_pixels"]
    assert r["degraded"]["pixel_accuracy"] == pytest.approx(r["corrupted_accuracy"])


# -- variants and the experiment -----------------------------------------------------------------------
def test_variants():
    assert DEFAULT_VARIANTS == ("single-frame", "T=1", "T=2 oldest-first", "T=2 newest-first",
                                "T=4 oldest-first", "T=4 newest-first")
    assert VARIANTS["single-frame"] == Variant("single-frame", 2, "current")
    assert parse_variant("T=4  newest-first") == VARIANTS["T=4 newest-first"]
    assert parse_variant("T=3") == Variant("T=3", 3, "oldest_first")
    assert parse_variant("T=3 current").memory_order == "current"
    assert VARIANTS["T=2 newest-first"].slug == "T2-newest-first"
    assert cross_orders(VARIANTS["single-frame"]) == ["oldest_first"]
    assert cross_orders(VARIANTS["T=1"]) == ["current"]  # reversing one slot changes nothing
    assert cross_orders(VARIANTS["T=4 oldest-first"]) == ["current", "newest_first"]
    assert cross_orders(VARIANTS["T=2 newest-first"]) == ["current", "oldest_first"]
    for bad in ("T=0", "T=2 sideways", "two frames"):
        with pytest.raises(InputError, match="unknown ablation variant"):
            parse_variant(bad)


def test_tiny_ablation_end_to_end_and_resume(tmp_path):
    out = tmp_path / "abl"
    kw = dict(iters=2, batch=1, crop=(32, 32), degradation=0.8, eval_clip_count=2, train_clips=1,
              clip_size=(32, 64), clip_frames=5, config=small_config().replace(**TINY), workers=0, progress=False)
    res = run_ablation(out, ["single-frame", "T=2 newest-first"], **kw)
    assert res["complete"] and [v["name"] for v in res["variants"]] == ["single-frame", "T=2 newest-first"]
    assert res["settings"]["score_from"] == 2 and res["settings"]["baseline"] == "single-frame"
    for v, order in zip(res["variants"], ("current", "newest_first")):
        assert v["memory_order"] == order and v["train"]["iters"] == 2
        assert v["eval"]["frames_scored"] == 6 and len(v["eval"]["per_clip"]) == 2
        meta = read_checkpoint(out / VARIANTS[v["name"]].slug / "model.pth")["meta"]
        assert meta["memory_order"] == order and meta["synthetic_degradation"] == 0.8
        assert meta["synthetic_first_target"] == 2
    d = res["variants"][1]["vs_baseline"]["miou"]
    per = [a["miou"] - b["miou"] for a, b in zip(res["variants"][1]["eval"]["per_clip"],
                                                 res["variants"][0]["eval"]["per_clip"])]
    assert d["n"] == 2 and d["mean"] == pytest.approx(np.mean(per))
    assert json.loads((out / "ablation.json").read_text())["variants"][1]["name"] == "T=2 newest-first"
    md = (out / "ablation.md").read_text().splitlines()
    head = md.index(next(line for line in md if line.startswith("| variant")))
    rows = md[head + 2:md.index("", head)]  # the main table: one row per variant
    assert [r.split("|")[1].strip() for r in rows] == ["single-frame", "T=2 newest-first"]
    assert "(baseline)" in rows[0] and "current" in rows[0] and "newest-first" in rows[1]
    assert f"{100 * res['variants'][1]['eval']['miou']:.1f}" in rows[1]
    # the cross evaluation: single-frame with real memory; T=2 newest-first without memory and reversed
    cross = [line for line in md if line.startswith("| single-frame |") or line.startswith("| T=2 newest-first |")]
    assert [tuple(c.split("|")[1:3]) for c in cross[2:]] == [(" single-frame ", " oldest-first "),
                                                            (" T=2 newest-first ", " current "),
                                                            (" T=2 newest-first ", " oldest-first ")]
    ce = res["variants"][1]["cross_eval"]
    assert sorted(ce) == ["current", "oldest_first"]
    assert ce["current"]["vs_own_order"]["miou"]["mean"] == pytest.approx(
        np.mean([a["miou"] - b["miou"] for a, b in zip(ce["current"]["per_clip"],
                                                       res["variants"][1]["eval"]["per_clip"])]))
    # same --out again: the finished runs are reused (no new iterations), the scores are identical
    mtime = (out / "single-frame" / "model.pth").stat().st_mtime_ns
    again = run_ablation(out, ["single-frame", "T=2 newest-first"], **kw)
    assert (out / "single-frame" / "model.pth").stat().st_mtime_ns == mtime
    assert [v["eval"]["miou"] for v in again["variants"]] == [v["eval"]["miou"] for v in res["variants"]]
    with pytest.raises(InputError, match=r"other settings \(synthetic_degradation\)"):
        run_ablation(out, ["single-frame"], **{**kw, "degradation": 0.5})


def test_ablation_over_seeds_reports_mean_and_spread(tmp_path, capsys):
    """--seeds: one resumable ablation per seed, then per variant the mean and sd over seeds of the overall and
    destroyed-pixel scores, the gain over the baseline and the cost of current-frame memory, seed by seed."""
    out = tmp_path / "abl"
    argv = ["--out", str(out), "--variants", "single-frame", "T=2 oldest-first", "--iters", "2", "--batch", "1",
            "--crop", "32,32", "--clip-size", "32,64", "--frames", "4", "--train-clips", "1", "--eval-clips", "2",
            "--workers", "0", "--seeds", "0", "1", "--damage-weight", "3", "--no-progress",
            "--config-override", *[f"{k}={v}" for k, v in TINY.items()]]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    runs = {s: json.loads((out / f"seed-{s}" / "ablation.json").read_text()) for s in (0, 1)}
    assert [runs[s]["settings"]["seed"] for s in (0, 1)] == [0, 1]
    assert read_checkpoint(out / "seed-1" / "T2-oldest-first" / "model.pth")["meta"]["damage_weight"] == 3.0
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and [r["name"] for r in summary["variants"]] == ["single-frame",
                                                                                         "T=2 oldest-first"]
    t2 = summary["variants"][1]
    by_seed = {s: {v["name"]: v for v in runs[s]["variants"]} for s in (0, 1)}
    destroyed = [by_seed[s]["T=2 oldest-first"]["eval"]["degraded"]["miou"] for s in (0, 1)]
    assert t2["spread"]["destroyed_miou"]["mean"] == pytest.approx(np.mean(destroyed))
    assert t2["spread"]["destroyed_miou"]["std"] == pytest.approx(np.std(destroyed, ddof=1))
    gain = [by_seed[s]["T=2 oldest-first"]["eval"]["degraded"]["miou"] -
            by_seed[s]["single-frame"]["eval"]["degraded"]["miou"] for s in (0, 1)]
    assert t2["spread"]["destroyed_miou_minus_baseline"]["mean"] == pytest.approx(np.mean(gain))
    cost = [by_seed[s]["T=2 oldest-first"]["eval"]["degraded"]["miou"] -
            by_seed[s]["T=2 oldest-first"]["cross_eval"]["current"]["degraded"]["miou"] for s in (0, 1)]
    assert t2["spread"]["destroyed_miou_minus_current_memory"]["mean"] == pytest.approx(np.mean(cost))
    assert summary["variants"][0]["spread"]["destroyed_miou_current_memory"]["n"] == 0  # no current cross-eval
    md = (out / "seeds.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| T=2 oldest-first |"))
    assert f"{100 * np.mean(destroyed):.1f} ± {100 * np.std(destroyed, ddof=1):.1f}" in row
    assert "(baseline)" in next(line for line in md.splitlines() if line.startswith("| single-frame |"))
    assert main([*argv[:-6], "--seeds", "1", "1"]) == 2
    assert "distinct seeds" in capsys.readouterr().err


def test_ablation_input_errors(tmp_path, capsys):
    with pytest.raises(InputError, match="score_from"):
        run_ablation(tmp_path / "a", ["T=1", "T=4 oldest-first"], score_from=2)
    with pytest.raises(InputError, match="nothing to train on or score"):
        run_ablation(tmp_path / "a", ["T=4 oldest-first"], clip_frames=4)
    with pytest.raises(InputError, match="train_from"):
        run_ablation(tmp_path / "a", ["T=2 oldest-first"], train_from=1)
    with pytest.raises(InputError, match="duplicate"):
        run_ablation(tmp_path / "a", ["T=1", "T=1"])
    with pytest.raises(InputError, match="baseline"):
        run_ablation(tmp_path / "a", ["T=1"], baseline="single-frame")
    assert not (tmp_path / "a").exists()
    assert main(["--out", str(tmp_path / "b"), "--variants", "T=2 sideways"]) == 2
    assert "unknown ablation variant" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
