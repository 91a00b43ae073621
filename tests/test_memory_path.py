"""The memory path trains: gradients reach the per-slot memory encoders and the attention read in one training
step, the training slot rule is the runtime's, and on a task only memory can solve (the memory probe) a tiny
network learns to read its memory."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import torch_threads
from tmanet.model import TMANet, tma_head
from tmanet.slots import memory_frame_indices
from tmanet.training.synthetic import ClipSpec, make_street_clip
from tmanet.training.recipe import Trainer, init_from_scratch, make_optimizer, memory_frame_order

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_training_step_reaches_every_memory_encoder_and_the_read(tiny_config, monkeypatch):
    frames, labels = make_street_clip(ClipSpec(frames=4, height=64, width=64, seed=3))
    batch = {"image": torch.from_numpy(frames[2:4]), "memory": torch.from_numpy(frames[[[0, 1], [1, 2]]]),
             "label": torch.from_numpy(labels[2:4]).long()}
    torch.manual_seed(0)
    model = init_from_scratch(TMANet(tiny_config, with_aux=True))  # what `tmanet train` starts from
    head = model.decode_head
    reads = []

    def keep_read(*args, **kwargs):  # the attention read's output, kept for its gradient
        read = real_read(*args, **kwargs)
        read.retain_grad()
        reads.append(read)
        return read
    real_read = tma_head.memory_read
    monkeypatch.setattr(tma_head, "memory_read", keep_read)
    before = {k: v.detach().clone() for k, v in head.state_dict().items()}
    trainer = Trainer(model, make_optimizer(model, lr=0.01), "cpu")
    trainer.step(batch)

    assert len(reads) == 1 and reads[0].grad.abs().sum() > 0
    T = tiny_config.memory_frames
    for conv in ("memory_key_conv", "memory_value_conv"):
        for layer in (0, 1):
            for slot in range(T):  # every slot's own weights
                m = getattr(head, conv)[layer][slot].conv
                assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, (conv, layer, slot)
                assert not torch.equal(m.weight.detach(), before[f"{conv}.{layer}.{slot}.conv.weight"])
    for conv in ("query_key_conv", "query_value_conv"):
        assert getattr(head, conv)[1].conv.weight.grad.abs().sum() > 0
    # the bottleneck's input is cat([query_value, read]): the read's half of its weights learns too
    cv = tiny_config.value_channels
    assert head.bottleneck.conv.weight.grad[:, cv:].abs().sum() > 0


@pytest.mark.parametrize("T", [1, 2, 4])
def test_training_slot_rule_is_the_runtime_rule(T):
    for start in (0, 3):
        for t in range(start, start + 7):
            assert memory_frame_order(t, T, "oldest_first", start) == memory_frame_indices(t, start, T)
            assert memory_frame_order(t, T, "newest_first", start) == memory_frame_indices(t, start, T)[::-1]
            assert memory_frame_order(t, T, "current", start) == [t] * T
    with pytest.raises(ValueError, match="precedes"):
        memory_frame_order(1, T, "oldest_first", start=2)
    assert np.array_equal(memory_frame_indices(5, 0, 2), [3, 4])  # slot T-1 is the frame just before t


# -- a task only memory can solve ----------------------------------------------------------------------
def test_probe_clips_hide_a_cell_the_previous_frame_shows():
    from tmanet.training.memory_probe import ProbeSpec, probe_clip
    spec = ProbeSpec(frames=6, height=32, width=64, grid=(2, 2), classes=4)
    frames, labels, blanked = probe_clip(spec, 7)
    assert frames.shape == (6, 32, 64, 3) and labels.shape == blanked.shape == (6, 32, 64)
    assert (labels == labels[0]).all() and labels.max() < 4  # a static scene
    for t in range(6):
        assert blanked[t].sum() == 16 * 32 and (frames[t][blanked[t]] == 0).all()  # one whole cell, black
        if t:
            assert not (blanked[t] & blanked[t - 1]).any()  # ... that the previous frame shows
    assert np.array_equal(probe_clip(spec, 7)[0], frames) and not np.array_equal(probe_clip(spec, 8)[0], frames)


@pytest.fixture(scope="module")
def probe_task():
    """The test probe: (spec, width-8 config, 16 held-out clips, the official-read network trained on it)."""
    from tmanet.training.memory_probe import PROBE_SEED_VAL, ProbeSpec, probe_clip, probe_config, train_probe
    spec = ProbeSpec(frames=5, height=32, width=64, grid=(2, 2), classes=4)
    config = probe_config(spec).replace(base_channels=8, key_channels=8, value_channels=16, channels=16,
                                        aux_channels=8)
    clips = [probe_clip(spec, PROBE_SEED_VAL + i) for i in range(16)]
    with torch_threads(1):  # a module fixture is set up before the per-test one_thread fixture
        memory, _ = train_probe(spec, "oldest_first", iters=600, seed=1, config=config)
    return spec, config, clips, memory


def test_memory_solves_what_a_single_frame_cannot(probe_task):
    """A tiny TMANet trained with the trainer's step on the probe task (600 SGD steps, ~45 s on one core) reads
    the hidden cell from its memory: far better on the hidden pixels than the same weights fed the current
    frame as memory and than the same network trained without history (both near chance, 1/4 accuracy)."""
    from tmanet.training.memory_probe import score_probe, train_probe
    spec, config, clips, memory = probe_task
    single, _ = train_probe(spec, "current", iters=600, seed=1, config=config)
    real = score_probe(memory, clips, "oldest_first")
    taken_away = score_probe(memory, clips, "current")
    baseline = score_probe(single, clips, "current")
    for r in (real, taken_away, baseline):
        assert r["visible"]["miou"] > 0.9  # the visible cells are easy for all three
        assert r["blanked"]["pixels"] == 16 * 3 * 16 * 32
    assert real["blanked"]["miou"] > taken_away["blanked"]["miou"] + 0.15
    assert real["blanked"]["miou"] > baseline["blanked"]["miou"] + 0.15
    assert real["blanked"]["pixel_accuracy"] > 0.4 > max(taken_away["blanked"]["pixel_accuracy"],
                                                         baseline["blanked"]["pixel_accuracy"]) + 0.05


def test_place_read_finds_what_the_current_frame_lost(probe_task):
    """The official read ranks memory positions by content only, so a blanked cell, whose query says nothing
    about its content, reads a blend of the whole memory (47 % IoU on the hidden cells). The same network with
    the ``place_read`` extension, same steps and seed, reads its own place and knows the cell (~90 %)."""
    from tmanet.training.memory_probe import score_probe, train_probe
    spec, config, clips, official = probe_task
    placed, _ = train_probe(spec, "oldest_first", iters=600, seed=1, config=config.replace(place_read=True))
    real = score_probe(placed, clips, "oldest_first")["blanked"]
    taken_away = score_probe(placed, clips, "current")["blanked"]
    assert real["miou"] > 0.8 and real["pixel_accuracy"] > 0.9
    assert real["miou"] > score_probe(official, clips, "oldest_first")["blanked"]["miou"] + 0.2
    assert taken_away["pixel_accuracy"] < 0.4  # without memory it is back to guessing


def test_probe_cli_writes_its_result(tmp_path, capsys):
    from tmanet.training.memory_probe import main
    argv = ["--iters", "2", "--batch", "2", "--size", "16,32", "--grid", "2,2", "--eval-clips", "1", "--out",
            str(tmp_path), "--config-override", "base_channels=8", "key_channels=8", "value_channels=8", "channels=8"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    assert list(result["runs"]) == ["memory, oldest-first at test", "memory, current at test",
                                    "single-frame, current at test"]
    assert result["config"]["base_channels"] == 8 and result["spec"]["grid"] == [2, 2]
    run = result["runs"]["memory, oldest-first at test"]
    assert run["blanked"]["pixels"] == 1 * 4 * 8 * 16  # frames 2..5 of one clip, one 8x16 cell each
    out = capsys.readouterr().out
    assert f"| {100 * run['blanked']['miou']:.1f} |" in out and "probe.json" in out
    assert main(["--grid", "0,2"]) == 2 and "--grid" in capsys.readouterr().err


# -- where the read looks ------------------------------------------------------------------------------
def test_read_weights_are_what_the_read_averages_the_values_with(tiny_config):
    torch.manual_seed(0)
    qk, mks = torch.randn(2, 16, 4, 6), [torch.randn(2, 16, 4, 6) for _ in range(3)]
    mvs = [torch.randn(2, 8, 4, 6) for _ in range(3)]
    weights = tma_head.read_weights(qk, mks)
    assert weights.shape == (2, 24, 72) and torch.allclose(weights.sum(-1), torch.ones(2, 24))
    values = torch.cat([v.flatten(2) for v in mvs], 2).transpose(1, 2)  # B, T*h*w, Cv
    read = tma_head.memory_read(qk, mks, mvs, query_chunk=5)
    torch.testing.assert_close((weights @ values).transpose(1, 2).reshape(2, 8, 4, 6), read)


def _clip_with_a_destroyed_half(T=2, size=(64, 128)):
    frames, labels = make_street_clip(ClipSpec(frames=T + 2, height=size[0], width=size[1], seed=5))
    damage = np.zeros(labels.shape, bool)
    damage[:, :, : size[1] // 2] = True  # the left half of every frame: whole feature cells at stride 8
    return frames, labels, damage


def test_read_locality_tells_a_positional_read_from_a_uniform_one(tiny_config):
    """A read whose keys are one-hot positions looks only at its own place (lift = 1 / uniform share); one whose
    keys are all equal is uniform (lift 1, entropy log(T*h*w))."""
    from tmanet.training.read_locality import read_locality, window_mass
    model = TMANet(tiny_config).eval()
    clip = _clip_with_a_destroyed_half()
    h, w = 8, 16
    T = tiny_config.memory_frames

    code = 40.0 * torch.eye(h * w).reshape(1, h * w, h, w)  # key channel c is 40 at cell c, 0 elsewhere
    head = model.decode_head
    head.encode_query = lambda feat: (code, None)
    head.encode_memory = lambda feats: ([code] * len(feats), None)
    local = read_locality(model, [clip], radius=0)
    for region in ("destroyed", "intact"):
        r = local[region]
        assert r["queries"] == 2 * h * w // 2  # frames T..T+1, half the cells each
        assert r["window_mass"] == pytest.approx(1.0, abs=1e-6)
        assert r["uniform_mass"] == pytest.approx(1 / (h * w)) and r["lift"] == pytest.approx(h * w, rel=1e-6)
    head.encode_query = lambda feat: (torch.ones(1, 4, h, w), None)
    head.encode_memory = lambda feats: ([torch.ones(1, 4, h, w) for _ in feats], None)
    flat = read_locality(model, [clip], radius=1)
    for region in ("destroyed", "intact"):
        r = flat[region]
        assert r["lift"] == pytest.approx(1.0) and r["entropy"] == pytest.approx(np.log(T * h * w), rel=1e-5)
    assert flat["max_entropy"] == pytest.approx(np.log(T * h * w))
    # the window at a corner holds 4 of the 9 cells: its uniform share counts only the cells inside
    mass, uniform = window_mass(torch.full((h * w, T, h, w), 1 / (T * h * w)), radius=1)
    assert uniform[0] == pytest.approx(4 / (h * w)) and uniform[w + 1] == pytest.approx(9 / (h * w))
    torch.testing.assert_close(mass, uniform)


def test_read_locality_cli(tmp_path, tiny_config, capsys):
    from tmanet.checkpoints import save_checkpoint
    from tmanet.training.read_locality import main
    ckpt = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    save_checkpoint(TMANet(tiny_config), ckpt)
    out = tmp_path / "loc.json"
    assert main([str(ckpt), "--clips", "1", "--frames", "3", "--size", "64,128", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["memory_positions"] == 2 * 8 * 16 and result["destroyed"]["queries"] + result["intact"]["queries"] > 0
    assert f"{result['intact']['lift']:.2f}" in printed.splitlines()[3]
    assert main([str(ckpt), "--json", str(ckpt)]) == 2  # never over its input
    assert "error:" in capsys.readouterr().err
    assert main([str(tmp_path / "none.pth")]) == 2
