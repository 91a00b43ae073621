"""tmanet train: the recipe pieces, an overfit check, checkpoints, exact resume, the CLI and a 2-process DDP run.

Everything runs a tiny ResNet-18 TMANet (width 16) on 64x64 crops of 64x128 synthetic clips, on the CPU.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tmanet.checkpoints import load_model, read_checkpoint
from tmanet.cli import main as cli_main
from tmanet.model import TMANet
from tmanet.training.synthetic import ClipSpec, make_street_clip
from tmanet.training.config import InputError, TrainConfig, parse_overrides, resolve_config
from tmanet.training.data import EpochSampler, parse_data
from tmanet.training.recipe import (Trainer, damage_weights, init_from_scratch, make_optimizer, poly_lr,
                                   segmentation_loss)
from tmanet.training.trainer import train

TINY = dict(base_channels=16, key_channels=16, value_channels=32, channels=32, aux_channels=16)
TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()]
SMALL = dict(crop=(64, 64), workers=0, synthetic_size=(64, 128), synthetic_frames=4, log_every=1, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- recipe pieces -------------------------------------------------------------------------------------
def test_poly_lr_schedule():
    # mmcv poly: (base - min) * (1 - it/max)^0.9 + min; halfway: 0.0099 * 0.5^0.9 + 1e-4.
    assert poly_lr(0, 80000, 0.01) == pytest.approx(0.01)
    assert poly_lr(40000, 80000, 0.01) == pytest.approx(0.0099 * math.exp(0.9 * math.log(0.5)) + 1e-4)
    assert poly_lr(40000, 80000, 0.01) == pytest.approx(0.00540528, abs=1e-8)
    assert poly_lr(80000, 80000, 0.01) == pytest.approx(1e-4)
    assert poly_lr(79999, 80000, 0.01) > 1e-4
    values = [poly_lr(i, 100, 0.01, power=0.9, min_lr=1e-4) for i in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert poly_lr(50, 100, 0.02, power=1.0, min_lr=0.0) == pytest.approx(0.01)  # linear with power 1
    assert poly_lr(50, 100, 1e-5) == pytest.approx(1e-5)  # a base below the floor stays put
    with pytest.raises(ValueError):
        poly_lr(0, 0, 0.01)


def test_segmentation_loss_ignores_255_and_averages_over_all_pixels():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0] = 2.0  # class 0 favoured everywhere
    label = torch.tensor([[[0, 1, 255, 255]]])
    per_pixel = torch.nn.functional.cross_entropy(logits, torch.tensor([[[0, 1, 0, 0]]]), reduction="none")[0, 0]
    expected = (per_pixel[0] + per_pixel[1]) / 4  # mmseg 0.x: ignored pixels count as zero loss
    assert segmentation_loss(logits, label).item() == pytest.approx(expected.item())
    assert segmentation_loss(logits, torch.full((1, 1, 4), 255)).item() == 0.0  # no NaN for an ignored batch


def test_damage_weight_is_a_weighted_mean_over_all_pixels():
    torch.manual_seed(0)
    logits, label = torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4))
    label[0, 0, :2] = 255
    damage = torch.rand(2, 3, 4) < 0.4
    per_pixel = torch.nn.functional.cross_entropy(logits, label, ignore_index=255, reduction="none")
    w = damage_weights(damage, 4.0)
    assert torch.equal(w, torch.where(damage, 4.0, 1.0))
    expected = (per_pixel * w).sum() / w.sum()
    assert segmentation_loss(logits, label, w).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(per_pixel.mean().item(), rel=1e-3)  # the weight changes the loss
    assert damage_weights(damage, 1.0) is None and damage_weights(None, 4.0) is None  # the plain loss
    assert segmentation_loss(logits, label, torch.ones(2, 3, 4)).item() == pytest.approx(
        segmentation_loss(logits, label).item(), rel=1e-6)


def test_trainer_weights_the_destroyed_pixels(tiny_config):
    """A batch with ``damage`` trains on the weighted loss; without it (or with weight 1) on the plain one."""
    torch.manual_seed(0)
    model = init_from_scratch(TMANet(tiny_config, with_aux=True))
    with torch.no_grad():  # favour one class: pixel losses then differ, so the weighting shows
        model.decode_head.conv_seg.bias[0] = 4.0
    frames, labels = make_street_clip(ClipSpec(frames=3, height=64, width=64, seed=2))
    batch = {"image": torch.from_numpy(frames[2:3]), "memory": torch.from_numpy(frames[None, :2]),
             "label": torch.from_numpy(labels[2:3].astype(np.int64))}
    damage = torch.zeros(1, 64, 64, dtype=torch.bool)
    damage[:, 10:40, 5:30] = True
    weighted = Trainer(model, make_optimizer(model), "cpu", damage_weight=3.0)
    model.eval()  # the same forward for every call
    with torch.no_grad():
        plain = Trainer(model, make_optimizer(model), "cpu").losses(batch)
        same = weighted.losses(batch)  # no damage in the batch: plain
        both = weighted.losses({**batch, "damage": damage})
        out = model(model.normalize(batch["image"]), model.normalize(batch["memory"]))
        logits = out[0] if isinstance(out, tuple) else out
    assert same[0].item() == pytest.approx(plain[0].item())
    w = damage_weights(damage, 3.0)
    assert both[1].item() == pytest.approx(segmentation_loss(logits, batch["label"], w).item(), rel=1e-5)
    assert both[1].item() != pytest.approx(plain[1].item(), rel=1e-3)


def test_init_from_scratch_zeroes_residual_branches(tiny_config):
    torch.manual_seed(0)
    model = init_from_scratch(TMANet(tiny_config, with_aux=True))
    for block in model.backbone.layer1:
        assert torch.count_nonzero(block.bn2.weight) == 0 and torch.all(block.bn1.weight == 1)
    assert model.decode_head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert torch.count_nonzero(model.auxiliary_head.conv_seg.bias) == 0


def test_overrides_and_config_resolution(tiny_config):
    assert parse_overrides(["base_channels=16", "align_corners=false", "slide_crop=[64,64]", "aggregation=sum"]) == \
        {"base_channels": 16, "align_corners": False, "slide_crop": [64, 64], "aggregation": "sum"}
    cfg, name = resolve_config("cityscapes-r18", TINY_ARGS)
    assert name == "cityscapes-r18" and cfg == tiny_config
    cfg, _ = resolve_config("cityscapes-r18", ["num_classes=5"])  # names/palette filled in
    assert cfg.num_classes == 5 and len(cfg.class_names) == 5 and len(cfg.palette) == 5
    for bad in (["nosuchfield=1"], ["base_channels"], ["depth=19"]):
        with pytest.raises(InputError):
            resolve_config("cityscapes-r18", bad)
    with pytest.raises(InputError, match="unknown preset"):
        resolve_config("nosuchpreset")


def test_parse_data(tmp_path):
    assert parse_data("synthetic").kind == "synthetic" and parse_data("synthetic").count is None
    assert parse_data("synthetic:7").count == 7
    for bad in ("synthetic:0", "synthetic:x", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(InputError):
            parse_data(bad)
    (tmp_path / "cs" / "gtFine").mkdir(parents=True)
    (tmp_path / "cs" / "leftImg8bit_sequence").mkdir()
    assert parse_data(tmp_path / "cs").kind == "cityscapes"
    (tmp_path / "cv" / "train").mkdir(parents=True)
    (tmp_path / "cv" / "trainannot").mkdir()
    assert parse_data(tmp_path / "cv").kind == "camvid"


def test_epoch_sampler_resumes_mid_stream():
    data = list(range(10))
    full = EpochSampler(data, world_size=2, rank=1, seed=3)
    stream = [x for _, x in zip(range(17), full)]
    resumed = EpochSampler(data, world_size=2, rank=1, seed=3, start=7)
    assert [x for _, x in zip(range(10), resumed)] == stream[7:17]
    # this rank's share of each epoch is a permutation half; the two ranks cover every index per epoch
    other = [x for _, x in zip(range(5), EpochSampler(data, world_size=2, rank=0, seed=3))]
    assert sorted(i for _, i in stream[:5] + other) == data
    assert {e for e, _ in stream} == {0, 1, 2, 3}


# -- training ------------------------------------------------------------------------------------------
def test_overfits_a_fixed_synthetic_batch(tiny_config):
    from tmanet.training.synthetic import ClipSpec, make_street_clip
    frames, labels = make_street_clip(ClipSpec(frames=4, height=64, width=64, seed=3))
    batch = {"image": torch.from_numpy(frames[2:4]), "memory": torch.from_numpy(frames[[[0, 1], [1, 2]]]),
             "label": torch.from_numpy(labels[2:4]).long()}
    torch.manual_seed(0)
    model = init_from_scratch(TMANet(tiny_config, with_aux=True))
    trainer = Trainer(model, make_optimizer(model, lr=0.01), "cpu")
    losses = [trainer.step(batch) for _ in range(16)]
    assert losses[0].decode_loss == pytest.approx(math.log(19), abs=0.1)  # near-uniform start (conv_seg std 0.01)
    assert losses[-1].loss < 0.75 * losses[0].loss
    assert losses[-1].decode_loss < 0.7 * losses[0].decode_loss
    assert losses[-1].aux_loss < losses[0].aux_loss


def test_train_writes_checkpoints_and_logs_that_load_without_preset(tmp_path, tiny_config):
    out = tmp_path / "run"
    summary = train("cityscapes-r18", "synthetic:2", out, iters=4, batch=2, overrides=TINY, keep_every=2, **SMALL)
    assert summary["finished"] and summary["end_iter"] == 4 and summary["samples"] == 2 * (4 - 2)
    assert sorted(p.name for p in out.iterdir()) == ["final.pth", "iter_2.pth", "latest.pth", "log.csv", "log.json",
                                                     "model.pth"]
    rows = read_log(out / "log.csv")
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["lr"]) for r in rows] == pytest.approx([poly_lr(i, 4, 0.01) for i in range(4)], rel=1e-5)
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["decode_loss"]) + 0.4 * float(r["aux_loss"]), abs=1e-5)
    logged = json.loads((out / "log.json").read_text())
    assert logged["end_iter"] == 4 and logged["config"]["base_channels"] == 16 and logged["world_size"] == 1

    raw = read_checkpoint(out / "final.pth")  # weights_only=True: tensors and plain containers only
    assert raw["iter"] == 4 and raw["meta"]["iters"] == 4 and "state" in raw["optimizer"]
    model = load_model(out / "final.pth")     # no preset: the config travels in the file
    assert model.config == tiny_config and model.auxiliary_head is None
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(v, raw["state_dict"][k]) for k, v in sd.items())
    assert any(k.startswith("auxiliary_head.") for k in raw["state_dict"])  # kept for fine-tuning / resume
    # the loaded model reproduces the training model's (eval) output from the same state
    trained = TMANet(tiny_config, with_aux=True).eval()
    trained.load_state_dict(raw["state_dict"])
    x = torch.randint(0, 256, (1, 64, 128, 3), dtype=torch.uint8)
    mem = torch.randint(0, 256, (1, 2, 64, 128, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref, _ = trained(trained.normalize(x), trained.normalize(mem))
        got = model(model.normalize(x), model.normalize(mem))
    assert torch.equal(ref, got)
    # model.pth: the same inference weights, without auxiliary head and optimizer, a fraction of the size
    slim = read_checkpoint(out / "model.pth")
    assert "optimizer" not in slim and not any(k.startswith("auxiliary_head.") for k in slim["state_dict"])
    assert (out / "model.pth").stat().st_size < 0.6 * (out / "final.pth").stat().st_size
    with torch.no_grad():
        assert torch.equal(load_model(out / "model.pth")(model.normalize(x), model.normalize(mem)), got)
    # the trained weights moved away from the initialisation
    torch.manual_seed(0)
    init = init_from_scratch(TMANet(tiny_config, with_aux=True))
    assert not torch.equal(init.decode_head.conv_seg.weight, raw["state_dict"]["decode_head.conv_seg.weight"])


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    args = dict(iters=5, batch=2, overrides=TINY, seed=4, checkpoint_every=100, **SMALL)
    train("cityscapes-r18", "synthetic:2", tmp_path / "a", **args)
    first = train("cityscapes-r18", "synthetic:2", tmp_path / "b", stop_after=2, **args)
    assert first["end_iter"] == 2 and not first["finished"] and not (tmp_path / "b" / "final.pth").exists()
    assert read_checkpoint(tmp_path / "b" / "latest.pth")["iter"] == 2
    # no config and no crop given: both come from the checkpoint (the preset default crop would differ)
    second = train(None, "synthetic:2", tmp_path / "b", resume=True, **{k: v for k, v in args.items()
                                                                          if k not in ("overrides", "crop")})
    assert second["start_iter"] == 2 and second["end_iter"] == 5 and second["finished"]
    a = read_checkpoint(tmp_path / "a" / "final.pth")
    b = read_checkpoint(tmp_path / "b" / "final.pth")
    assert a["iter"] == b["iter"] == 5
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b, strict=True))
    assert [r["loss"] for r in read_log(tmp_path / "a" / "log.csv")] == \
        [r["loss"] for r in read_log(tmp_path / "b" / "log.csv")]
    assert len(json.loads((tmp_path / "b" / "log.json").read_text())["history"]) == 1


def test_bad_runs_are_refused_before_anything_is_written(tmp_path, caplog):
    with pytest.raises(InputError, match="nothing to resume"):
        train(None, "synthetic:1", tmp_path / "none", resume=True, **SMALL)
    with pytest.raises(InputError, match="preset"):
        train(None, "synthetic:1", tmp_path / "none", **SMALL)
    with pytest.raises(InputError, match="Cityscapes preset"):
        train("camvid-r50", "synthetic:1", tmp_path / "none", iters=1, batch=1, **SMALL)
    assert not (tmp_path / "none").exists()
    out = tmp_path / "run"
    train("cityscapes-r18", "synthetic:1", out, iters=1, batch=1, overrides=TINY, **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(InputError, match="already holds a training run"):
        train("cityscapes-r18", "synthetic:1", out, iters=2, batch=1, overrides=TINY, **SMALL)
    with pytest.raises(InputError, match="another config"):
        train("cityscapes-r18", "synthetic:1", out, iters=2, batch=1, resume=True, **SMALL)  # not the tiny one
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # resuming with other arguments is allowed, but said: the run no longer matches an uninterrupted one
    with caplog.at_level(logging.WARNING, logger="tmanet"):
        done = train(None, "synthetic:1", out, iters=1, batch=1, lr=0.5, resume=True, **SMALL)
    assert done["start_iter"] == done["end_iter"] == 1
    assert "resuming with lr=0.5, but the run was started with lr=0.01" in caplog.text



def test_train_config_resumes_by_comparing_configs(caplog):
    """Not given (None): the run's own value; given and different: kept, with a warning; iters may be raised."""
    run = TrainConfig(data="synthetic:2", iters=10, lr=0.02, crop=(64, 64), memory_order="newest-first",
                      synthetic_degradation=0.3)
    meta = {"preset": "cityscapes-r18", "world_size": 1, **run.meta(synthetic=True)}
    assert meta["crop"] == [64, 64] and meta["memory_order"] == "newest_first"  # plain lists in the checkpoint
    with caplog.at_level(logging.WARNING, logger="tmanet"):
        same = TrainConfig(data="synthetic:2", iters=20, lr=0.02).resumed(meta)
    assert same == dataclasses.replace(run, iters=20) and not caplog.text
    with caplog.at_level(logging.WARNING, logger="tmanet"):
        other = TrainConfig(data="synthetic:2", iters=10, lr=0.5, crop=(32, 32)).resumed(meta)
    assert other.lr == 0.5 and other.crop == (32, 32) and other.memory_order == "newest_first"
    assert "resuming with lr=0.5, but the run was started with lr=0.02" in caplog.text
    assert "resuming with crop=[32, 32], but the run was started with crop=[64, 64]" in caplog.text
    old = {k: v for k, v in meta.items() if k not in ("memory_order", "synthetic_degradation")}  # older runs
    filled = TrainConfig(data="synthetic:2", iters=10, lr=0.02).resumed(old).completed(tiny_cfg(), synthetic=True)
    assert filled.memory_order == "oldest_first" and filled.synthetic_degradation == 0.5
    new = TrainConfig(synthetic_size=(64, 128)).completed(tiny_cfg(), synthetic=True)  # crop: the slide window,
    assert new.crop == (64, 128)                                                       # clipped to the clips
    assert "synthetic_degradation" not in run.meta(synthetic=False)
    assert new.damage_weight == 1.0 and "damage_weight" not in run.meta(synthetic=False)
    with pytest.raises(InputError, match="damage weight needs synthetic data"):
        TrainConfig(damage_weight=4).completed(tiny_cfg(), synthetic=False)
    with pytest.raises(InputError, match="damage weight must be positive"):
        TrainConfig(damage_weight=0)
    with pytest.raises(InputError, match="memory order"):
        TrainConfig(memory_order="sideways")
    with pytest.raises(InputError, match="iters and batch must be positive"):
        TrainConfig(iters=0)
    with pytest.raises(InputError, match="crop must be H,W"):
        TrainConfig(crop="a,b")


def tiny_cfg():
    cfg, _ = resolve_config("cityscapes-r18", TINY)
    return cfg

def test_init_from_a_checkpoint_without_aux_head(tmp_path, make_tiny_model):
    from tmanet.checkpoints import save_checkpoint
    source = make_tiny_model(seed=5)  # no auxiliary head, random BN statistics
    save_checkpoint(source, tmp_path / "src.pth")
    summary = train("cityscapes-r18", "synthetic:1", tmp_path / "run", iters=1, batch=1, lr=1e-12,
                    overrides=TINY, init=tmp_path / "src.pth", **SMALL)
    assert summary["notes"] and "auxiliary head" in summary["notes"][0]
    got = read_checkpoint(tmp_path / "run" / "final.pth")["state_dict"]
    # one step at lr ~0 leaves the convolution weights as loaded (BN statistics do move in train mode)
    for k in ("backbone.stem.0.weight", "decode_head.query_key_conv.1.conv.weight"):
        torch.testing.assert_close(got[k], source.state_dict()[k], rtol=0, atol=1e-6)


def test_init_gives_a_place_read_to_a_checkpoint_without_one(tmp_path, make_tiny_model):
    from tmanet.checkpoints import CheckpointError, save_checkpoint
    from tmanet.training.trainer import init_weights
    source = make_tiny_model(seed=5)
    save_checkpoint(source, tmp_path / "src.pth")
    summary = train("cityscapes-r18", "synthetic:1", tmp_path / "run", iters=1, batch=1, lr=1e-12,
                    overrides={**TINY, "place_read": True}, init=tmp_path / "src.pth", **SMALL)
    assert any("no place read" in n for n in summary["notes"])
    assert read_checkpoint(tmp_path / "run" / "model.pth")["meta"]["init"] == str((tmp_path / "src.pth").resolve())
    model = load_model(tmp_path / "run" / "final.pth")
    assert model.config.place_read
    # the projection started at zero and one step at lr ~0 kept it there: the loaded model is the source's
    assert model.decode_head.place_proj.weight.abs().max() < 1e-9
    torch.testing.assert_close(model.decode_head.query_key_conv[1].conv.weight,
                               source.decode_head.query_key_conv[1].conv.weight, rtol=0, atol=1e-6)
    # the other way round is a disagreement: a place read's weights have nowhere to go in a model without one
    with pytest.raises(CheckpointError, match="place_read"):
        init_weights(TMANet(tiny_cfg()), tmp_path / "run" / "final.pth")


def test_train_on_a_cityscapes_layout(tmp_path):
    from tmanet.training.synthetic import ClipSpec, write_cityscapes_sequence
    root = tmp_path / "cityscapes"
    write_cityscapes_sequence(root, [ClipSpec(frames=4, height=64, width=128, seed=s) for s in (1, 2)],
                              split="train", annotate=3)
    summary = train("cityscapes-r18", str(root), tmp_path / "run", iters=2, batch=2, overrides=TINY, **SMALL)
    assert summary["samples"] == 2 and summary["finished"]
    assert len(read_log(tmp_path / "run" / "log.csv")) == 2


def test_train_cli(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "cityscapes-r18", "--config-override", *TINY_ARGS, "--data", "synthetic:1",
            "--iters", "2", "--batch", "1", "--crop", "64,64", "--workers", "0", "--out", str(out),
            "--synthetic-size", "64,128", "--synthetic-frames", "3", "--log-every", "1", "--no-progress"]
    assert cli_main(argv) == 0
    said = capsys.readouterr().out
    assert "trained iterations 0..2 of 2" in said
    assert f"export the weights: tmanet export {out}/model.pth" in said  # which file to export is named
    assert load_model(out / "model.pth").config.base_channels == 16
    assert load_model(out / "final.pth").config.base_channels == 16
    # errors: one clear line, exit status 2
    assert cli_main(argv) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert cli_main(["train", "--data", "synthetic", "--out", str(tmp_path / "x")]) == 2
    assert "--preset is required" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "cityscapes-r18", "--data", "nowhere", "--out", str(tmp_path / "x")]) == 2
    assert "neither 'synthetic[:N]' nor an existing folder" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "cityscapes-r18", "--data", "synthetic", "--crop", "0,5",
                     "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_train_on_cuda(tmp_path, capsys, amp):
    """The CLI on a CUDA device (optionally bf16 autocast): trains, logs finite losses, and the checkpoint
    loads on the CPU and runs there."""
    out = tmp_path / "cuda"
    argv = ["train", "--preset", "cityscapes-r18", "--config-override", *TINY_ARGS, "--data", "synthetic:2",
            "--iters", "4", "--batch", "2", "--crop", "64,64", "--workers", "0", "--out", str(out),
            "--synthetic-size", "64,128", "--synthetic-frames", "4", "--log-every", "1", "--no-progress",
            "--device", "cuda"] + (["--amp"] if amp else [])
    assert cli_main(argv) == 0
    assert "trained iterations 0..4 of 4" in capsys.readouterr().out
    rows = read_log(out / "log.csv")
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    model = load_model(out / "final.pth")  # CPU tensors, whatever device trained it
    clip = make_street_clip(ClipSpec(frames=3, height=64, width=128, seed=5))[0]
    assert model.predict_clip(clip).shape == (1, 19, 64, 128)


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: both train, rank 0 alone writes the checkpoints and logs."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tmanet.cli", "train", "--preset", "cityscapes-r18", "--config-override", *TINY_ARGS,
           "--data", "synthetic:2", "--iters", "3", "--batch", "2", "--crop", "64,64", "--workers", "0",
           "--out", str(out), "--synthetic-size", "64,128", "--synthetic-frames", "4", "--log-every", "1",
           "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained iterations 0..3 of 3") == 1  # printed by rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["final.pth", "latest.pth", "log.csv", "log.json", "model.pth"]
    assert json.loads((out / "log.json").read_text())["world_size"] == 2
    assert [int(r["iter"]) for r in read_log(out / "log.csv")] == [1, 2, 3]
    raw = read_checkpoint(out / "final.pth")
    assert raw["iter"] == 3 and raw["meta"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in raw["state_dict"])  # saved unwrapped from DDP
    model = load_model(out / "final.pth")
    assert np.isfinite(model.decode_head.conv_seg.weight.detach().numpy()).all()
