"""``make demo``: the whole path on the CPU, the embedded default.

checkpoint -> reference checks (predict_clip vs the streaming split) -> ``tmanet export`` -> ONNX Runtime
streaming runtime on a driving clip -> overlay video, mIoU against the clip's labels -> benchmark against the
official protocol. Everything lands in ``--out`` (default ``demo_out/``).

The checkpoint is the trained demo model shipped in ``tmanet/data/demo_model.pth`` (a narrow ResNet-18
TMANet with the place read, trained on our synthetic driving clips, see ``demo_model.json`` beside it).
Without it the demo uses synthetic weights in the official R50 layout and says so: its masks are then not meaningful.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from tmanet.pictures import LAYOUTS

DATA = Path(__file__).resolve().parent / "data"
DEMO_MODEL = DATA / "demo_model.pth"
DEMO_INFO = DATA / "demo_model.json"


def say(msg=""):
    print(msg, flush=True)


def pick_checkpoint(out: Path, given=None) -> tuple[Path, str, dict]:
    if given:
        return Path(given), "checkpoint given with --checkpoint", {}
    if DEMO_MODEL.is_file():
        info = json.loads(DEMO_INFO.read_text()) if DEMO_INFO.is_file() else {}
        what = "trained demo model (narrow ResNet-18 TMANet with the place read, synthetic driving clips)"
        return DEMO_MODEL, what, info
    from tmanet.synthetic_weights import write_official_checkpoint
    path = write_official_checkpoint("cityscapes", 0, out / "official_layout_seed0.pth")
    return path, ("SYNTHETIC WEIGHTS in the official cityscapes-r50 layout (no trained demo model shipped): "
                  "the masks below are not meaningful"), {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tmanet.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--checkpoint", help="use this checkpoint instead of the shipped demo model")
    p.add_argument("--frames", type=int, default=24, help="frames of the demo clip")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--bench-frames", type=int, default=20)
    p.add_argument("--seed", type=int, default=2026, help="seed of the synthetic driving clip")
    p.add_argument("--layout", choices=LAYOUTS, default="side-by-side",
                   help="overlay.mp4: the frame beside its colours (side-by-side) or the colours only (overlay)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tmanet").setLevel(logging.INFO)

    import torch
    from PIL import Image

    from tmanet.checkpoints import load_model
    from tmanet.export import export_onnx
    from tmanet.manifest import load_manifest
    from tmanet.runtime import StreamingSegmenter
    from tmanet.safe_files import atomic_file, write_json
    from tmanet.runtime.bench import format_report, run_bench
    from tmanet.pictures import render
    from tmanet.io.video import VideoWriter
    from tmanet.metrics import FlipCounter, confusion_matrix, scores_from_confusion
    from tmanet.training.synthetic import ClipSpec, make_street_clip
    torch.set_num_threads(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    t0 = time.perf_counter()

    ckpt, what, info = pick_checkpoint(out, a.checkpoint)
    say(f"[1/5] checkpoint: {ckpt}\n      {what}")
    model = load_model(ckpt)
    cfg = model.config
    T = cfg.memory_frames
    say(f"      ResNet-{cfg.depth} width {cfg.base_channels}, T={T}, Ck={cfg.key_channels}, Cv={cfg.value_channels}, "
        f"{cfg.num_classes} classes")
    frames, labels = make_street_clip(ClipSpec(frames=a.frames, height=a.height, width=a.width, degradation=0.5,
                                               seed=a.seed))
    with atomic_file(out / "clip.npy") as tmp:
        np.save(tmp, frames)
    report.update(checkpoint=str(ckpt), checkpoint_kind=what, demo_model=info, clip={
        "frames": a.frames, "size": [a.height, a.width], "seed": a.seed, "degradation": 0.5})
    say(f"      clip: {a.frames} synthetic street frames {a.height}x{a.width} with labels (seed {a.seed}); each frame "
        "is degraded at random (motion blur, exposure, glare blobs, noise and dropped grey rectangles: the "
        "patches you see), and the memory of earlier frames is what lets the model see through them")

    say(f"[2/5] reference: predict_clip (official protocol, backbone once per frame) vs stream (split, BN folded)")
    started = time.perf_counter()
    ref = model.predict_clip(frames[:T + 3])
    streamed = np.stack([r.logits for r in model.stream(frames[:T + 3])][T:])
    diff = float(np.abs(ref - streamed).max())
    say(f"      {len(ref)} frames: max |d logits| = {diff:.2e} ({time.perf_counter() - started:.1f} s)")
    if diff > 1e-3 * max(1.0, float(ref.std())):
        raise SystemExit(f"demo: stream() and predict_clip() disagree by {diff}")
    report["reference_max_abs_diff"] = diff

    say(f"[3/5] export {a.height}x{a.width} -> {out / 'export'}")
    started = time.perf_counter()
    export_dir = export_onnx(model, out / "export", a.height, a.width, checkpoint=ckpt,
                             preset=None, check_frames=frames[:T + 2])
    check = load_manifest(export_dir).check
    say(f"      ONNX Runtime vs torch: logits max |d| {check['logits_max_abs']:.2e}, masks "
        f"{100 * check['mask_agreement']:.2f}% equal ({time.perf_counter() - started:.1f} s)")
    report["export_check"] = check

    say(f"[4/5] ONNX Runtime (CPU) streaming runtime on the {a.frames}-frame clip -> {out / 'overlay.mp4'}")
    cm = np.zeros((cfg.num_classes, cfg.num_classes), np.int64)
    flips = FlipCounter()
    flips.start_clip()
    started = time.perf_counter()
    with StreamingSegmenter.open(export_dir, backend="ort") as seg, VideoWriter(out / "overlay.mp4", fps=10) as video:
        for t, frame in enumerate(frames):
            mask = seg.push(frame).mask
            video.write(render(frame, mask, cfg.palette, cfg.class_names, a.layout))
            if t == len(frames) - 1:  # a still of the last frame, memory full: frame, colours, legend
                preview = render(frame, mask, cfg.palette, cfg.class_names, "side-by-side")
                with atomic_file(out / "preview.png") as tmp:
                    Image.fromarray(preview).save(tmp)
            if t >= T:  # the official protocol scores frames with a full memory
                cm += confusion_matrix(mask, labels[t], cfg.num_classes)
                flips.add(mask, labels[t])
    seconds = time.perf_counter() - started
    scores = scores_from_confusion(cm, list(cfg.class_names))
    temporal = flips.result()
    say(f"      {a.frames} frames in {seconds:.1f} s ({a.frames / seconds:.1f} fps incl. video encoding); "
        f"mIoU {100 * scores['miou']:.1f}%, pixel accuracy {100 * scores['pixel_accuracy']:.1f}% against the clip's "
        f"labels; temporal consistency {100 * temporal['temporal_consistency']:.1f}%")
    report["runtime"] = {"backend": "ort", "frames": a.frames, "seconds": seconds, **{
        k: scores[k] for k in ("miou", "pixel_accuracy")}, "per_class": scores["per_class"],
        "temporal": temporal}

    say(f"[5/5] benchmark: streaming runtime vs the official protocol (backbone on 1+T frames per frame)")
    bench = run_bench(export_dir, backend="ort", frames=a.bench_frames, warmup=3, compare_official=True,
                      progress=False)
    write_json(out / "bench.json", bench)
    say("      " + format_report(bench).replace("\n", "\n      "))
    report["bench"] = {k: bench[k] for k in ("fps", "latency_ms", "peak_memory_mb", "official_fps",
                                             "speedup_vs_official")}
    report["seconds"] = time.perf_counter() - t0
    write_json(out / "report.json", report, default=str)
    say(f"\ndone in {report['seconds']:.0f} s: {out}/overlay.mp4 ({a.layout}, with a legend of the classes present), "
        f"preview.png (the last frame: frame | colours and class boundaries | legend), bench.json, report.json")
    say(f"checkpoint: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
