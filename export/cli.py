"""``tmanet export``: checkpoint -> frame_encoder.onnx + memory_head.onnx + manifest.json."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("export", help="export a checkpoint to the split ONNX graphs",
                       description="Export a TMANet checkpoint (official mmcv, bare state_dict or native) to "
                                   "frame_encoder.onnx + memory_head.onnx + manifest.json, then check ONNX Runtime "
                                   "against torch on real frames.")
    p.add_argument("checkpoint", help="checkpoint file (.pth)")
    p.add_argument("--preset", help="preset the checkpoint must match (default: inferred from its shapes)")
    p.add_argument("--height", type=int, required=True, help="input frame height (pixels)")
    p.add_argument("--width", type=int, required=True, help="input frame width (pixels)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch: cameras x slide windows (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension free (1..64)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--check-frames", help="frames for the ORT-vs-torch check (.npy clip, video or image folder; "
                                          "default: a synthetic clip)")
    p.add_argument("--query-chunk", type=int, help="queries per attention chunk in the head (default 1024; 0: all "
                                                           "queries in one chunk)")
    p.add_argument("--tolerance", type=float, help="allowed ORT-vs-torch logits error, as a fraction of the "
                                                   "logits' standard deviation (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the ORT-vs-torch check")
    p.set_defaults(func=run)


def run(args) -> int:
    from tmanet.checkpoints import load_model
    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from .manifest import check_replaceable
    from .onnx_export import DEFAULT_TOLERANCE, export_onnx
    if args.height < 32 or args.width < 32:
        raise UserError(f"--height/--width must be at least 32, got {args.height}x{args.width}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.query_chunk is not None and args.query_chunk < 0:
        raise UserError(f"--query-chunk must be >= 0 (0: all queries in one chunk), got {args.query_chunk}")
    check_output(args.out, "dir", "--out")
    refuse_overwriting_inputs([args.out], [args.checkpoint, args.check_frames])
    check_replaceable(args.out)
    model = load_model(args.checkpoint, args.preset)
    frames = None
    if args.check_frames:
        import numpy as np

        from tmanet.io.video import open_frames
        source = open_frames(args.check_frames, max_frames=model.config.memory_frames + 2)
        frames = np.stack([frame for frame, _ in source])
        if frames.shape[1:3] != (args.height, args.width):
            raise UserError(f"--check-frames are {frames.shape[2]}x{frames.shape[1]}, the export is "
                            f"{args.width}x{args.height}")
    out = export_onnx(model, args.out, args.height, args.width, batch=args.batch, dynamic_batch=args.dynamic_batch,
                      preset=args.preset, checkpoint=args.checkpoint, check=not args.no_check, check_frames=frames,
                      query_chunk=args.query_chunk, tolerance=args.tolerance or DEFAULT_TOLERANCE)
    print(f"exported to {out}/ (frame_encoder.onnx, memory_head.onnx, manifest.json)")
    return 0
