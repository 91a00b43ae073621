"""tmanet eval: end-to-end scoring of a checkpoint and an export
directory on synthetic clips and on a Cityscapes-layout folder, checked against independent computations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tmanet.checkpoints import load_model, save_checkpoint
from tmanet.cli import main as cli_main
from tmanet.metrics import confusion_matrix, region_scores, scores_from_confusion
from tmanet.training.evaluate import Predictor, evaluate, feature_size, format_report
from tmanet.training.synthetic import ClipSpec, make_street_clip, make_street_clip_with_damage, write_cityscapes_sequence
from tmanet.training.config import InputError
from tmanet.training.data import SYNTHETIC_VAL_SEED

H, W, F = 64, 128, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def test_feature_size_matches_the_encoder(make_tiny_model):
    model = make_tiny_model()
    encoder, _ = model.split((8, 8))
    for h, w in ((64, 128), (65, 97), (33, 40)):
        with torch.no_grad():
            qk = encoder(torch.zeros(1, h, w, 3, dtype=torch.uint8))[0]
        assert tuple(qk.shape[-2:]) == feature_size(model.config, h, w)
    assert feature_size(model.config.replace(output_stride=16), 65, 97) == (5, 7)


# -- end to end ----------------------------------------------------------------------------------------
def val_clips(count, frames=F, degradation=0.5):
    return [make_street_clip(ClipSpec(frames=frames, height=H, width=W, degradation=degradation,
                                      seed=SYNTHETIC_VAL_SEED + i)) for i in range(count)]


def reference(model, clips, first):
    """Confusion matrix (pair counting, no bincount) and flip rate from ``model.stream``."""
    C = model.config.num_classes
    cm = np.zeros((C, C), np.int64)
    stable = flipped = 0
    for frames, labels in clips:
        masks = [r.mask for r in model.stream(frames, return_logits=False)]
        for t in range(first, len(frames)):
            g, p = labels[t], masks[t]
            for i in np.unique(g):
                for j in np.unique(p[g == i]):
                    cm[i, j] += int(np.sum((g == i) & (p == j)))
            if t > first:
                keep = labels[t - 1] == g
                stable += int(keep.sum())
                flipped += int((keep & (masks[t - 1] != p)).sum())
    return cm, flipped / stable


def test_evaluate_checkpoint_on_synthetic_clips(tiny_ckpt):
    model = load_model(tiny_ckpt)
    clips = val_clips(2)
    for all_frames, first in ((False, 2), (True, 0)):
        r = evaluate(tiny_ckpt, "synthetic:2", synthetic_size=(H, W), synthetic_frames=F, all_frames=all_frames,
                     progress=False)
        cm, flip = reference(model, clips, first)
        np.testing.assert_array_equal(np.array(r["confusion"]), cm)
        assert r["frames_scored"] == 2 * (F - first) and r["clips"] == 2
        expected = scores_from_confusion(cm, model.config.class_names)
        assert r["miou"] == pytest.approx(expected["miou"]) and r["per_class"] == expected["per_class"]
        assert r["temporal"]["flip_rate"] == pytest.approx(flip)
        assert r["temporal"]["temporal_consistency"] == pytest.approx(1 - flip)
        assert r["kind"] == "checkpoint" and r["backend"] == "torch"
    text = format_report(r)
    assert "mIoU" in text and "temporal" in text and f"{100 * r['miou']:6.2f}" in text


def test_evaluate_slide_mode_matches_the_official_merge(make_tiny_model, tmp_path):
    # windows of 48x64 with stride 24x32 over 64x128 frames: 2 x 3 overlapping windows
    model = make_tiny_model(seed=4, slide_crop=(48, 64), slide_stride=(24, 32))
    save_checkpoint(model, tmp_path / "slide.pth")
    r = evaluate(tmp_path / "slide.pth", "synthetic:1", mode="slide", synthetic_size=(H, W), synthetic_frames=F,
                 all_frames=True, progress=False)
    frames, labels = val_clips(1)[0]
    T = model.config.memory_frames
    padded = np.concatenate([np.repeat(frames[:1], T, 0), frames])  # warm-up: memory clamps to frame 0
    logits = model.predict_clip(padded, mode="slide")
    cm = sum(confusion_matrix(lg.argmax(0), lb, 19) for lg, lb in zip(logits, labels))
    # the runtime folds BN into the convs: argmax ties may flip a handful of pixels, no more
    assert np.abs(np.array(r["confusion"]) - cm).sum() <= 2 * 0.002 * cm.sum()
    whole = evaluate(tmp_path / "slide.pth", "synthetic:1", synthetic_size=(H, W), synthetic_frames=F,
                     all_frames=True, progress=False)
    assert whole["confusion"] != r["confusion"]  # the windows really were used


def test_evaluate_export_dir_ort_and_torch(tiny_ckpt, tiny_export):
    ckpt = evaluate(tiny_ckpt, "synthetic:2", synthetic_size=(H, W), synthetic_frames=F, progress=False)
    ort = evaluate(tiny_export, "synthetic:2", synthetic_frames=F, progress=False)  # size: the export's
    assert ort["kind"] == "export" and ort["backend"] == "ort" and ort["synthetic"]["size"] == [H, W]
    diff = np.abs(np.array(ort["confusion"]) - np.array(ckpt["confusion"])).sum()
    assert diff <= 2 * 0.001 * ort["pixels"]
    assert ort["miou"] == pytest.approx(ckpt["miou"], abs=2e-3)
    torch_dir = evaluate(tiny_export, "synthetic:2", backend="torch", synthetic_frames=F, progress=False)
    assert torch_dir["confusion"] == ckpt["confusion"]  # the manifest's checkpoint, same torch path
    with pytest.raises(InputError, match="differs from the export size"):
        evaluate(tiny_export, "synthetic:1", synthetic_size=(H, W + 8), synthetic_frames=F, progress=False)


def test_checkpoint_with_ort_backend_exports_at_the_frame_size(tiny_ckpt, tiny_export, monkeypatch):
    import tmanet.export
    calls = []

    def fake_export(model, out, height, width, **kw):
        calls.append((height, width, kw.get("checkpoint")))
        return tiny_export  # the real export of the same checkpoint at this size
    monkeypatch.setattr(tmanet.export, "export_onnx", fake_export)
    r = evaluate(tiny_ckpt, "synthetic:1", backend="ort", synthetic_size=(H, W), synthetic_frames=F, progress=False)
    assert calls == [(H, W, tiny_ckpt)] and r["backend"] == "ort"
    direct = evaluate(tiny_export, "synthetic:1", synthetic_frames=F, progress=False)
    assert r["confusion"] == direct["confusion"]


def test_evaluate_cityscapes_layout(tiny_ckpt, tmp_path):
    root = tmp_path / "cityscapes"
    clips = [make_street_clip(ClipSpec(frames=F, height=H, width=W, seed=s)) for s in (11, 12, 13)]
    write_cityscapes_sequence(root, clips, split="val", annotate=F - 1)
    model = load_model(tiny_ckpt)
    cm = np.zeros((19, 19), np.int64)
    for frames, labels in clips:  # memory = the T frames before the target, streamed from the first of them
        mask = list(model.stream(frames[F - 3:F], return_logits=False))[-1].mask
        cm += confusion_matrix(mask, labels[F - 1], 19)
    r = evaluate(tiny_ckpt, str(root), split="val", progress=False)
    np.testing.assert_array_equal(np.array(r["confusion"]), cm)
    assert r["frames_scored"] == 3 and r["temporal"] is None
    assert "temporal consistency: n/a" in format_report(r)
    assert evaluate(tiny_ckpt, str(root), split="val", limit=1, progress=False)["frames_scored"] == 1
    with pytest.raises(InputError, match="label folder"):
        evaluate(tiny_ckpt, str(root), split="train", progress=False)


def test_evaluate_synthetic_degradation(tiny_ckpt):
    model = load_model(tiny_ckpt)
    heavy = evaluate(tiny_ckpt, "synthetic:1", synthetic_size=(H, W), synthetic_frames=F, progress=False,
                     synthetic_degradation=0.95)
    cm, _ = reference(model, val_clips(1, degradation=0.95), 2)
    np.testing.assert_array_equal(np.array(heavy["confusion"]), cm)
    assert heavy["synthetic"]["degradation"] == 0.95
    default = evaluate(tiny_ckpt, "synthetic:1", synthetic_size=(H, W), synthetic_frames=F, progress=False)
    assert default["synthetic"]["degradation"] == 0.5 and default["confusion"] != heavy["confusion"]
    with pytest.raises(InputError, match=r"degradation must lie in \[0, 1\]"):
        evaluate(tiny_ckpt, "synthetic:1", synthetic_degradation=1.5, progress=False)


def test_eval_cli(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["eval", str(tiny_ckpt), "--data", "synthetic:1", "--synthetic-size", f"{H},{W}",
            "--synthetic-frames", str(F), "--json", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert f"{100 * saved['miou']:6.2f}" in printed and "pixel acc" in printed
    direct = evaluate(tiny_ckpt, "synthetic:1", synthetic_size=(H, W), synthetic_frames=F, progress=False)
    assert saved["confusion"] == direct["confusion"] and saved["miou"] == pytest.approx(direct["miou"])
    for bad, message in (([str(tmp_path / "nothing.pth"), "--data", "synthetic"], "neither a checkpoint"),
                         ([str(tiny_ckpt), "--data", "synthetic:x"], "positive integer"),
                         ([str(tiny_ckpt), "--data", "synthetic", "--backend", "trt"], "trt backend"),
                         ([str(tmp_path), "--data", "synthetic"], "not an export directory"),
                         ([str(tiny_ckpt), "--data", "synthetic", "--synthetic-degradation", "-0.1"],
                          "degradation must lie in [0, 1]")):
        assert cli_main(["eval", *bad]) == 2
        assert message in capsys.readouterr().err


def test_region_scores_hand_made():
    # 6 pixels of class 0 (4 right) and 2 of class 1 (1 right), 1 class-1 pixel predicted 0 ... on 8 pixels:
    # IoU(0) = 4 / (6 + 5 - 4) = 4/7, IoU(1) = 1 / (2 + 3 - 1) = 1/4, accuracy 5/8
    gt = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    r = region_scores(confusion_matrix(pred, gt, 3))
    assert r == {"miou": pytest.approx((4 / 7 + 1 / 4) / 2), "pixel_accuracy": pytest.approx(5 / 8), "pixels": 8}
    assert region_scores(np.zeros((3, 3), np.int64)) == {"miou": None, "pixel_accuracy": None, "pixels": 0}


def test_evaluate_scores_degraded_pixels_apart(tiny_ckpt):
    model = load_model(tiny_ckpt)
    r = evaluate(tiny_ckpt, "synthetic:2", synthetic_size=(H, W), synthetic_frames=F, progress=False,
                 synthetic_degradation=0.9)
    bad = np.zeros((19, 19), np.int64)
    good = np.zeros((19, 19), np.int64)
    for i in range(2):  # pair counting on the renderer's damage masks, frames t >= T
        frames, labels, damage = make_street_clip_with_damage(ClipSpec(frames=F, height=H, width=W, degradation=0.9,
                                                                seed=SYNTHETIC_VAL_SEED + i))
        masks = [m.mask for m in model.stream(frames, return_logits=False)]
        for t in range(2, F):
            for cm, where in ((bad, damage[t]), (good, ~damage[t])):
                g, p = labels[t][where], masks[t][where]
                for a in np.unique(g):
                    for b in np.unique(p[g == a]):
                        cm[a, b] += int(np.sum((g == a) & (p == b)))
    assert r["degraded"]["pixels"] == bad.sum() > 0.05 * r["pixels"]
    assert r["intact"]["pixels"] == good.sum() and bad.sum() + good.sum() == r["pixels"]
    for key, cm in (("degraded", bad), ("intact", good)):
        expected = scores_from_confusion(cm)
        assert r[key]["miou"] == pytest.approx(expected["miou"])
        assert r[key]["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert r["degraded"]["pixel_accuracy"] != pytest.approx(r["intact"]["pixel_accuracy"])
    # each clip's confusions are kept (for eval-compare): they add up to the pooled ones
    assert [c["seed"] for c in r["per_clip"]] == [SYNTHETIC_VAL_SEED, SYNTHETIC_VAL_SEED + 1]
    np.testing.assert_array_equal(sum(np.array(c["confusion_degraded"]) for c in r["per_clip"]), bad)
    np.testing.assert_array_equal(sum(np.array(c["confusion"]) for c in r["per_clip"]), bad + good)
    assert r["per_clip"][0]["confusion"] != r["per_clip"][1]["confusion"]
    text = format_report(r)
    assert f"{100 * r['degraded']['miou']:6.2f}" in text and f"on {bad.sum()} px" in text
    clean = evaluate(tiny_ckpt, "synthetic:1", synthetic_size=(H, W), synthetic_frames=F, progress=False,
                     synthetic_degradation=0.0)
    assert clean["degraded"] == {"miou": None, "pixel_accuracy": None, "pixels": 0}


def test_evaluate_with_the_current_frame_as_memory(tiny_ckpt, tiny_export):
    model = load_model(tiny_ckpt)
    cm = np.zeros((19, 19), np.int64)
    for frames, labels in val_clips(2):
        for t in range(2, F):  # a one-frame stream: every memory slot clamps to the frame itself
            mask = next(iter(model.stream(frames[t:t + 1], return_logits=False))).mask
            cm += confusion_matrix(mask, labels[t], 19)
    current = evaluate(tiny_ckpt, "synthetic:2", synthetic_size=(H, W), synthetic_frames=F, progress=False,
                       memory_source="current")
    np.testing.assert_array_equal(np.array(current["confusion"]), cm)
    real = evaluate(tiny_ckpt, "synthetic:2", synthetic_size=(H, W), synthetic_frames=F, progress=False)
    assert current["memory_source"] == "current" and real["memory_source"] == "real"
    assert real["confusion"] != current["confusion"]  # the memory does change the masks of this model
    on_ort = evaluate(tiny_export, "synthetic:2", synthetic_frames=F, progress=False, memory_source="current")
    assert np.abs(np.array(on_ort["confusion"]) - cm).sum() <= 2 * 0.001 * cm.sum()
    assert "memory current" in format_report(current)
    with pytest.raises(InputError, match="memory source"):
        evaluate(tiny_ckpt, "synthetic:1", memory_source="previous", progress=False)


def test_eval_cli_memory_source_and_degraded_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "current.json"
    argv = ["eval", str(tiny_ckpt), "--data", "synthetic:1", "--synthetic-size", f"{H},{W}", "--synthetic-frames",
            str(F), "--memory-source", "current", "--json", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    saved = json.loads(out.read_text())
    direct = evaluate(tiny_ckpt, "synthetic:1", synthetic_size=(H, W), synthetic_frames=F, progress=False,
                      memory_source="current")
    assert saved["memory_source"] == "current" and saved["confusion"] == direct["confusion"]
    assert saved["degraded"] == direct["degraded"] and set(saved["degraded"]) == {"miou", "pixel_accuracy", "pixels"}
    assert "degraded" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli_main(["eval", str(tiny_ckpt), "--data", "synthetic", "--memory-source", "past"])
    assert stop.value.code == 2 and "invalid choice: 'past'" in capsys.readouterr().err


def test_predictor_refuses_bad_mode(tiny_ckpt):
    with pytest.raises(InputError, match="mode"):
        Predictor(tiny_ckpt, mode="tiles")
