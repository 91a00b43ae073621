"""Shared fixtures and markers.

The suite tests itself without ../shared: the set-A golden arrays live in tests/data, the official key
layouts ship in tmanet/data, and official-layout checkpoints are regenerated with our own generator.

Markers: ``@pytest.mark.gpu`` (needs a CUDA device) and ``@pytest.mark.tensorrt`` (needs the ``tensorrt``
module) are skipped, with the reason shown, where the machine lacks them.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

# Reproducible float32: no TF32 matmuls/convs on GPUs, and a fixed CPU thread count (the golden was made
# with 2 threads; 1 vs 2 threads already moves logits by ~1e-4).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_num_threads(2)

DATA = Path(__file__).resolve().parent / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "tensorrt: needs the TensorRT Python module (skipped when it is absent)")


def _has_tensorrt() -> bool:
    # Import for real: PyPI's tensorrt stub packages are findable but fail to import.
    try:
        importlib.import_module("tensorrt")
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    wants_gpu = any(item.get_closest_marker("gpu") for item in items)
    wants_trt = any(item.get_closest_marker("tensorrt") for item in items)
    # Probe only when some collected test asks: torch.cuda initialisation is not free.
    no_gpu = wants_gpu and not torch.cuda.is_available()
    no_trt = wants_trt and not _has_tensorrt()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (the 'tensorrt' Python module cannot be imported)")
    for item in items:
        if no_gpu and item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
        if no_trt and item.get_closest_marker("tensorrt"):
            item.add_marker(skip_trt)


# -- set A (official model outputs) ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def set_a() -> dict:
    """Golden set A: ``clip`` (5,64,128,3) uint8, ``logits`` (3,19,64,128) for frames 2..4, ``masks``,
    ``diagnostic`` (the wrong, newest-first memory order) and ``info`` (the JSON)."""
    return {
        "clip": np.load(DATA / "setA_cityscapes_clip.npy"),
        "logits": np.load(DATA / "setA_cityscapes_logits.npy"),
        "masks": np.load(DATA / "setA_cityscapes_masks.npy"),
        "diagnostic": np.load(DATA / "setA_cityscapes_logits_DIAGNOSTIC_memory_newest_first.npy"),
        "info": json.loads((DATA / "setA_cityscapes.json").read_text()),
    }


@pytest.fixture(scope="session")
def official_cityscapes_ckpt(tmp_path_factory) -> Path:
    """The official-layout cityscapes R50 checkpoint of set A (seed 0), built by our generator."""
    from tmanet.synthetic_weights import write_official_checkpoint
    return write_official_checkpoint("cityscapes", 0, tmp_path_factory.mktemp("official") / "cityscapes_seed0.pth")


@pytest.fixture(scope="session")
def official_camvid_ckpt(tmp_path_factory) -> Path:
    from tmanet.synthetic_weights import write_official_checkpoint
    return write_official_checkpoint("camvid", 1, tmp_path_factory.mktemp("official") / "camvid_seed1.pth")


@pytest.fixture(scope="session")
def official_model(official_cityscapes_ckpt):
    """The set-A model loaded through ``load_model`` (no preset). Shared: do not modify it."""
    from tmanet.checkpoints import load_model
    return load_model(official_cityscapes_ckpt)


# -- tiny models for fast tests -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_config():
    """A ResNet-18 TMANet small enough for 2 CPU cores (T=2, Ck=16, Cv=32, 19 classes)."""
    from tmanet.presets import get_preset
    return get_preset("cityscapes-r18").replace(base_channels=16, key_channels=16, value_channels=32,
                                                channels=32, aux_channels=16)


RESIDUAL_GAIN = 0.4  # last conv of each residual branch: keeps activations from doubling per block
KEY_GAIN = 0.45      # attention key convs: softmax neither one-hot nor uniform (~2.4 nats at Ck=16)


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded He-normal convs (damped like the official synthetic rule) and non-trivial BN statistics and
    affine parameters: fresh BNs are the identity, which would hide folding mistakes, and PyTorch's default
    conv init makes the memory read nearly irrelevant to the output."""
    from tmanet.model.resnet import BasicBlock, Bottleneck
    damped = set()
    for name, m in model.named_modules():
        if isinstance(m, Bottleneck):
            damped.add(f"{name}.conv3.weight")
        elif isinstance(m, BasicBlock):
            damped.add(f"{name}.conv2.weight")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, v in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            if v.ndim == 4:
                gain = RESIDUAL_GAIN if key in damped else KEY_GAIN if "_key_conv." in key else 1.0
                v.copy_(torch.randn(v.shape, generator=g) * (math.sqrt(2.0 / v[0].numel()) * gain))
            elif key.endswith(("running_mean", "bias")):
                v.copy_(0.1 * torch.randn(v.shape, generator=g))
            else:  # running_var, BN weight
                v.copy_(0.5 + torch.rand(v.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def make_tiny_model(tiny_config):
    """``make_tiny_model(seed=0, with_aux=False, config=tiny_config, **config_changes)`` -> an eval-mode
    TMANet with seeded random weights and BN statistics (:func:`randomize_weights`)."""
    from tmanet.model import TMANet

    def make(seed: int = 0, with_aux: bool = False, config=None, **changes):
        config = config or tiny_config
        model = TMANet(config.replace(**changes) if changes else config, with_aux=with_aux)
        return randomize_weights(model, seed).eval()
    return make


@pytest.fixture(scope="session")
def small_clip():
    """A 4-frame 64x128 synthetic clip (not set A's)."""
    from tmanet.test_clips import make_noise_clip
    return make_noise_clip(4, 64, 128, seed=7)


@pytest.fixture(scope="session")
def tiny_export_dir(tmp_path_factory, make_tiny_model):
    """``tiny_export_dir(batch=1, dynamic=False)`` -> a 64x128 export of ``make_tiny_model(0)`` (its
    checkpoint beside it, for the torch backend), built once per session and shared by the test files."""
    from tmanet.checkpoints import save_checkpoint
    from tmanet.export import export_onnx
    root = tmp_path_factory.mktemp("tiny_exports")
    model = make_tiny_model(0)
    ckpt = root / "tiny.pth"
    save_checkpoint(model, ckpt)
    built = {}

    def get(batch: int = 1, dynamic: bool = False) -> Path:
        key = "dynamic" if dynamic else f"batch{batch}"
        if key not in built:
            built[key] = export_onnx(model, root / key, 64, 128, batch=batch, dynamic_batch=dynamic,
                                     checkpoint=ckpt, check=False)
        return built[key]
    return get


@pytest.fixture(scope="session")
def export_b1(tiny_export_dir) -> Path:
    """The batch-1 64x128 export of ``make_tiny_model(0)``."""
    return tiny_export_dir()


@pytest.fixture(scope="session")
def tiny_ckpt(make_tiny_model, tmp_path_factory) -> Path:
    """A native checkpoint of ``make_tiny_model(seed=3)``."""
    from tmanet.checkpoints import save_checkpoint
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pth"
    save_checkpoint(make_tiny_model(seed=3), path)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory) -> Path:
    """The 64x128 batch-1 export of :func:`tiny_ckpt` (read-only: tests write their outputs elsewhere)."""
    from tmanet.checkpoints import load_model
    from tmanet.export import export_onnx
    return export_onnx(load_model(tiny_ckpt), tmp_path_factory.mktemp("tiny_export") / "fp32", 64, 128,
                       checkpoint=tiny_ckpt, check=False)


@contextlib.contextmanager
def torch_threads(n: int):
    """``n`` torch intra-op threads inside the block, the previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: on two cores shared with other jobs, OpenMP spin-waits make training ~10x slower."""
    with torch_threads(1):
        yield


# -- comparisons (plain functions: ``from conftest import max_abs, top2_margin``) --------------------------
def max_abs(a, b) -> float:
    """Largest absolute difference, computed in float64."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Gap between the largest and second largest logit per pixel; logits (C, H, W)."""
    part = np.sort(logits, axis=0)
    return part[-1] - part[-2]
