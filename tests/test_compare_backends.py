"""``tmanet compare`` on one export across two backends (as Polygraphy's ``run --onnxrt --trt``): the torch
reference against ONNX Runtime on the same frames, and the one-line refusals of a malformed --backends."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tmanet.cli import main
from tmanet.test_clips import make_noise_clip


def test_one_export_on_two_backends(export_b1, tmp_path, capsys):
    np.save(tmp_path / "clip.npy", make_noise_clip(5, 64, 128, seed=51))
    out = tmp_path / "cmp.json"
    assert main(["compare", str(export_b1), "--frames", str(tmp_path / "clip.npy"), "--backends", "torch,ort",
                 "--threads", "1", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert (result["a"]["backend"], result["b"]["backend"]) == ("torch", "ort") and result["frames"] == 5
    assert result["pixel_agreement"] > 0.999 and result["logits_max_rel"] < 1e-3  # the export check's tolerance
    first = result["first_differing_frame"]
    assert first is None or result["worst_frame_agreement"] < 1.0
    said = capsys.readouterr().out
    assert said.splitlines()[2].split() == ["backend", "torch", "ort"]
    assert ("masks equal on every frame" if first is None else f"first frame that differs: {first}") in said


@pytest.mark.parametrize("argv, message", [
    ([], "needs two exports (DIR_A DIR_B) or two backends"),
    (["--backends", "ort"], "takes two backends A,B"),
    (["--backends", "ort,nosuch"], "unknown backend 'nosuch'"),
    (["--backends", "ort,torch:bf16"], "the torch backend takes no precision 'bf16' (it takes fp32, fp16)"),
])
def test_malformed_backends_are_one_line(export_b1, tmp_path, argv, message, capsys):
    np.save(tmp_path / "clip.npy", make_noise_clip(2, 64, 128, seed=52))
    assert main(["compare", str(export_b1), "--frames", str(tmp_path / "clip.npy"), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
