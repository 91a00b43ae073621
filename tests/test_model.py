"""The PyTorch model: deployment split vs the official protocol, chunked attention, slide mode, backbones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tmanet.model import TMANet
from tmanet.model.resnet import ResNetV1c
from tmanet.model.slide import slide_windows
from tmanet.model import tma_head
from tmanet.model.tma_head import fused_read, memory_read
from tmanet.presets import get_preset
from tmanet.test_clips import make_noise_clip
from tmanet.synthetic_weights import read_manifest


def assert_close(actual, expected, rel=1e-4, what=""):
    """|a - e| <= rel * max|e| (float32 through different but equivalent arithmetic)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1e-6)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max |delta| {err:.3g} > {rel} x {scale:.3g}"
    return err


# -- the split (BN folded, FrameEncoder / MemoryHead) equals the official protocol ----------------------
@pytest.mark.parametrize("aggregation, query_chunk, place", [("concat", 0, False), ("concat", 7, False),
                                                            ("sum", None, False), ("concat", 5, True)])
def test_split_equals_official_forward(make_tiny_model, aggregation, query_chunk, place):
    model = make_tiny_model(seed=3, aggregation=aggregation, place_read=place)
    if place:  # the projection carries weight, so the place read is part of what the split must reproduce
        assert model.decode_head.place_proj.weight.abs().min() > 0
    T = model.config.memory_frames
    H, W = 64, 96
    clip = make_noise_clip(T + 2, H, W, seed=11)
    frames = torch.from_numpy(clip)
    encoder, head = model.split((H, W), query_chunk=query_chunk)
    with torch.no_grad():
        qk, qv, mk, mv = encoder(frames)  # the whole clip as one batch
        x = model.normalize(frames)
        feats = model.backbone(x)[1]
        ref_qk, ref_qv = model.decode_head.encode_query(feats)
        ref_mk, ref_mv = model.decode_head.encode_all_slots(feats)
    h, w = H // 8, W // 8
    assert qk.shape == (T + 2, model.config.key_channels, h, w)
    assert mv.shape == (T + 2, T, model.config.value_channels, h, w)
    for got, ref, name in [(qk, ref_qk, "query_key"), (qv, ref_qv, "query_value"), (mk, ref_mk, "memory_key"),
                           (mv, ref_mv, "memory_value")]:
        assert_close(got, ref, what=name)
    # Slot weights differ, so a frame's encodings under different slots differ (else the slot test is void).
    assert (mk[:, 0] - mk[:, 1]).abs().max() > 1e-3

    for t in range(T, T + 2):
        slots = list(range(t - T, t))  # slot i <- frame t-T+i
        with torch.no_grad():
            mask, logits = head(qk[t:t + 1], qv[t:t + 1], *[mk[f:f + 1, i] for i, f in enumerate(slots)],
                                *[mv[f:f + 1, i] for i, f in enumerate(slots)])
            # The official protocol: backbone on the target and on each memory frame, unfolded BN.
            official = model(x[t:t + 1], torch.stack([x[f] for f in slots])[None])
        assert mask.dtype == torch.uint8 and mask.shape == (1, H, W) and logits.shape == official.shape
        assert_close(logits, official, what=f"frame {t} logits")
        assert torch.equal(mask, logits.argmax(1).to(torch.uint8))
        # Swapping the memory slots changes the output: the head is slot-sensitive.
        with torch.no_grad():
            _, swapped = head(qk[t:t + 1], qv[t:t + 1], *[mk[f:f + 1, i] for i, f in enumerate(slots[::-1])],
                              *[mv[f:f + 1, i] for i, f in enumerate(slots[::-1])])
        assert (swapped - logits).abs().max() > 1e-3


def test_sum_aggregation_builds_and_runs(make_tiny_model):
    model = make_tiny_model(seed=5, aggregation="sum")
    assert model.decode_head.bottleneck.conv.in_channels == model.config.value_channels
    concat = make_tiny_model(seed=5)
    assert concat.decode_head.bottleneck.conv.in_channels == 2 * concat.config.value_channels
    clip = make_noise_clip(3, 32, 64, seed=2)
    out = model.predict_clip(clip)
    assert out.shape == (1, model.config.num_classes, 32, 64) and np.isfinite(out).all()
    streamed = list(model.stream(clip))
    assert_close(streamed[2].logits, out[0], what="sum aggregation stream vs predict_clip")


# -- the place read (extension) -------------------------------------------------------------------------
def test_place_read_is_a_softmax_over_the_slots_at_each_place():
    g = torch.Generator().manual_seed(4)
    qk = torch.randn(2, 5, 3, 4, generator=g)
    keys = [torch.randn(2, 5, 3, 4, generator=g) for _ in range(3)]
    values = [torch.randn(2, 6, 3, 4, generator=g) for _ in range(3)]
    read = tma_head.place_read(qk, keys, values)
    for b, y, x in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        w = torch.softmax(torch.stack([qk[b, :, y, x] @ k[b, :, y, x] for k in keys]), 0)
        expected = sum(w[i] * values[i][b, :, y, x] for i in range(3))
        assert_close(read[b, :, y, x], expected, rel=1e-5, what=f"place read at {(b, y, x)}")
    # Only the own place is read: changing memory elsewhere leaves this position's read as it is.
    moved = [v.clone() for v in values]
    moved[1][:, :, 0, 0] += 100.0
    changed = (tma_head.place_read(qk, keys, moved) - read).abs().amax(1)
    assert changed[:, 0, 0].min() > 1e-3 and changed.flatten(1)[:, 1:].max() == 0


def test_place_read_starts_as_the_model_without_it(make_tiny_model):
    """A model given the extension computes, before any training, exactly the model without it."""
    from tmanet.training.recipe import init_from_scratch
    plain = make_tiny_model(seed=6)
    placed = TMANet(plain.config.replace(place_read=True)).eval()
    init_from_scratch(placed)
    assert placed.decode_head.place_proj.weight.abs().max() == 0
    missing, unexpected = placed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["decode_head.place_proj.weight", "decode_head.place_proj.bias"] and not unexpected
    clip = make_noise_clip(4, 32, 64, seed=2)
    np.testing.assert_array_equal(placed.predict_clip(clip), plain.predict_clip(clip))


def test_place_read_config_is_a_bool(tiny_config):
    with pytest.raises(ValueError, match="place_read must be true or false"):
        tiny_config.replace(place_read="yes")


# -- chunked memory read --------------------------------------------------------------------------------
def test_chunked_memory_read_equals_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(0)
    T, ck, cv, h, w = 3, 8, 12, 6, 11  # 66 queries: chunks of 7 leave a remainder
    q = torch.randn(2, ck, h, w, generator=g)
    mks = [torch.randn(2, ck, h, w, generator=g) for _ in range(T)]
    mvs = [torch.randn(2, cv, h, w, generator=g) for _ in range(T)]
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[1]) or bmm(a, b))
    full = memory_read(q, mks, mvs, query_chunk=0)
    assert calls == [h * w]
    calls.clear()
    chunked = memory_read(q, mks, mvs, query_chunk=7)
    assert calls == [7] * 9 + [3]  # really chunked
    assert chunked.shape == full.shape == (2, cv, h, w)
    assert_close(chunked, full, rel=1e-6, what="chunked vs unchunked")
    # Reference written out: softmax over all T*h*w positions (slot-major), no 1/sqrt(C) scaling.
    keys = torch.cat([k.flatten(2) for k in mks], 2)
    values = torch.cat([v.flatten(2) for v in mvs], 2)
    attn = torch.softmax(torch.einsum("bcq,bcm->bqm", q.flatten(2), keys), -1)
    ref = torch.einsum("bqm,bcm->bcq", attn, values).reshape(2, cv, h, w)
    assert_close(full, ref, rel=1e-5, what="memory read vs einsum reference")



# -- fused attention read (CUDA) ------------------------------------------------------------------------
def random_read_inputs(device, n=2048, s=4096, ck=64, cv=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, ck, generator=g) * 0.3   # scores of a few nats: neither one-hot nor uniform
    k = torch.randn(1, ck, s, generator=g) * 0.3
    v = torch.randn(1, s, cv, generator=g)
    return q.to(device), k.to(device), v.to(device)


def test_fused_read_declines_the_cpu_and_memory_read_falls_back():
    q, k, v = random_read_inputs("cpu", n=32, s=48, ck=8, cv=12)
    assert fused_read(q, k, v) is None
    qk = q.transpose(1, 2).reshape(1, 8, 4, 8)
    mks = [k[..., :24].reshape(1, 8, 4, 6), k[..., 24:].reshape(1, 8, 4, 6)]
    mvs = [v[:, :24].transpose(1, 2).reshape(1, 12, 4, 6), v[:, 24:].transpose(1, 2).reshape(1, 12, 4, 6)]
    assert torch.equal(memory_read(qk, mks, mvs, fused=True), memory_read(qk, mks, mvs))


def test_memory_head_never_fuses_inside_an_onnx_export(make_tiny_model, monkeypatch):
    model = make_tiny_model(seed=1)
    _, head = model.split((64, 128))
    calls = []
    monkeypatch.setattr(tma_head, "fused_read", lambda *a: calls.append(1))  # declines, as on the CPU
    T, ck, cv = model.config.memory_frames, model.config.key_channels, model.config.value_channels
    inputs = [torch.randn(1, ck, 8, 16), torch.randn(1, cv, 8, 16)] + \
             [torch.randn(1, ck, 8, 16) for _ in range(T)] + [torch.randn(1, cv, 8, 16) for _ in range(T)]
    head(*inputs)
    assert calls == []                    # off unless the runtime turns it on
    head.fused_attention = True
    head(*inputs)
    assert calls == [1]
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    head(*inputs)
    assert calls == [1]                   # an exported graph keeps the portable matmul/softmax


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_fused_read_matches_float64_on_cuda(dtype, rel):
    q, k, v = random_read_inputs("cuda")
    want = torch.softmax(q.double() @ k.double(), -1) @ v.double()
    got = fused_read(q.to(dtype), k.to(dtype), v.to(dtype))
    assert got is not None, "no fused attention kernel for Ck=64, Cv=256 on this GPU"
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert_close(got.cpu(), want.cpu(), rel=rel, what=f"fused read {dtype}")


# -- slide mode -----------------------------------------------------------------------------------------
def reference_windows(H, W, crop, stride):
    """The official slide_inference grid, written from the reference README."""
    hc, wc = crop
    hs, ws = stride
    h_grids = max(H - hc + hs - 1, 0) // hs + 1
    w_grids = max(W - wc + ws - 1, 0) // ws + 1
    out = []
    for h in range(h_grids):
        for w in range(w_grids):
            y1, x1 = h * hs, w * ws
            y2, x2 = min(y1 + hc, H), min(x1 + wc, W)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            out.append((y1, y2, x1, x2))
    return out


@pytest.mark.parametrize("H, W, crop, stride", [
    (64, 48, (32, 80), (20, 40)),   # 3 overlapping rows; crop wider than the image
    (40, 72, (24, 40), (16, 24)),   # overlaps on both axes, last row/column shifted back
])
def test_slide_mode_equals_per_window_reference(make_tiny_model, H, W, crop, stride):
    model = make_tiny_model(seed=4)
    T = model.config.memory_frames
    clip = make_noise_clip(T + 2, H, W, seed=21)
    windows = reference_windows(H, W, crop, stride)
    assert slide_windows(H, W, crop, stride) == windows
    canvas = np.zeros((2, model.config.num_classes, H, W), np.float64)
    count = np.zeros((H, W), np.float64)
    for y1, y2, x1, x2 in windows:
        canvas[:, :, y1:y2, x1:x2] += model.predict_clip(clip[:, y1:y2, x1:x2], mode="whole")
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1 and count.max() >= 2  # every pixel covered, some overlap
    reference = canvas / count
    slide = model.predict_clip(clip, mode="slide", crop=crop, stride=stride)
    assert slide.shape == reference.shape
    assert_close(slide, reference, rel=1e-5, what="slide vs per-window reference")
    # Slide mode is not whole mode in disguise here (windows see less context).
    whole = model.predict_clip(clip, mode="whole")
    assert np.abs(whole - slide).max() > 1e-3


def test_slide_with_crop_larger_than_image_is_whole(make_tiny_model):
    model = make_tiny_model(seed=4)
    clip = make_noise_clip(3, 32, 48, seed=3)
    assert slide_windows(32, 48, (769, 769), (513, 513)) == [(0, 32, 0, 48)]
    np.testing.assert_array_equal(model.predict_clip(clip, mode="slide"), model.predict_clip(clip))
    with pytest.raises(ValueError, match="mode"):
        model.predict_clip(clip, mode="tiles")


# -- backbones ------------------------------------------------------------------------------------------
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # mmseg arch_settings


def expected_backbone_keys(depth):
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = set()
    for conv, norm in ((0, 1), (3, 4), (6, 7)):
        keys.add(f"stem.{conv}.weight")
        keys.update(f"stem.{norm}.{p}" for p in bn)
    n_convs = 3 if depth >= 50 else 2
    for stage, blocks in enumerate(STAGE_BLOCKS[depth], 1):
        for j in range(blocks):
            p = f"layer{stage}.{j}"
            for c in range(1, n_convs + 1):
                keys.add(f"{p}.conv{c}.weight")
                keys.update(f"{p}.bn{c}.{x}" for x in bn)
            if j == 0 and (depth >= 50 or stage > 1):  # channel or stride change
                keys.add(f"{p}.downsample.0.weight")
                keys.update(f"{p}.downsample.1.{x}" for x in bn)
    return keys


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_depths_and_output_strides(depth, output_stride):
    torch.manual_seed(0)
    base = 8
    net = ResNetV1c(depth, base_channels=base, output_stride=output_stride).eval()
    assert set(net.state_dict()) == expected_backbone_keys(depth)
    expansion = 4 if depth >= 50 else 1
    with torch.no_grad():
        c3, c4 = net(torch.randn(1, 3, 64, 96))
    assert c4.shape == (1, base * 8 * expansion, 64 // output_stride, 96 // output_stride)
    assert c3.shape == (1, base * 4 * expansion, 64 // output_stride, 96 // output_stride)


def test_resnet50_dilations_follow_contract_dilation():
    net = ResNetV1c(50, base_channels=8, output_stride=8)
    assert tuple(net.stem[0].stride) == (2, 2) and tuple(net.layer2[0].conv2.stride) == (2, 2)
    assert tuple(net.layer2[0].conv1.stride) == (1, 1)  # "pytorch" style: stride on the 3x3 conv
    expected = {"layer3": [1] + [2] * 5, "layer4": [2, 4, 4], "layer1": [1] * 3, "layer2": [1] * 4}
    for name, dilations in expected.items():
        got = [blk.conv2.dilation[0] for blk in getattr(net, name)]
        pads = [blk.conv2.padding[0] for blk in getattr(net, name)]
        assert got == dilations and pads == dilations, name
    assert tuple(net.layer3[0].downsample[0].stride) == (1, 1)


@pytest.mark.parametrize("preset, manifest", [("cityscapes-r50", "cityscapes"), ("camvid-r50", "camvid")])
def test_state_dict_layout_equals_official_manifest(preset, manifest):
    """Keys, order, shapes and dtypes of model.state_dict() (aux head included) are the official ones."""
    with torch.device("meta"):  # no weight init: only the layout is compared
        model = TMANet(get_preset(preset), with_aux=True)
    got = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    want = read_manifest(manifest)
    assert [k for k, _, _ in got] == [k for k, _, _ in want]
    assert got == want
    # Without the aux head: the manifest minus the training-only auxiliary entries.
    with torch.device("meta"):
        bare = TMANet(get_preset(preset))
    assert list(bare.state_dict()) == [k for k, _, _ in want if not k.startswith("auxiliary_head.")]


def test_normalize_is_the_official_formula(make_tiny_model):
    model = make_tiny_model()
    frames = make_noise_clip(2, 8, 12, seed=1)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    expected = ((frames.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(model.normalize(torch.from_numpy(frames)).numpy(), expected, rtol=0, atol=1e-6)


def test_light_preset_r18_runs(make_tiny_model):
    model = make_tiny_model(seed=1, config=get_preset("cityscapes-r18"))
    assert model.config == get_preset("cityscapes-r18")
    clip = make_noise_clip(3, 64, 128, seed=9)
    out = model.predict_clip(clip)
    assert out.shape == (1, 19, 64, 128) and np.isfinite(out).all()
    results = list(model.stream(clip))
    assert [r.mask.shape for r in results] == [(64, 128)] * 3
    assert_close(results[2].logits, out[0], what="r18 stream vs predict_clip")
