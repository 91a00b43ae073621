"""The memory read softmax(q k^T) v at the official sizes (Ck=64, Cv=256, scale 1, batch 1), fp16 on CUDA: each
fused kernel torch offers, and layouts that fit FlashAttention, timed with CUDA events; max error against an fp32
chunked reference. Run by .ci/gpu-check; the runtime's read is tmanet/model/tma_head.py: fused_read (today: the
padded FlashAttention row). Random q, k, v: a kernel's speed here does not depend on the weights."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def reference(q, k, v):
    out = []
    for i in range(0, q.shape[2], 2048):
        p = torch.softmax(q[0, 0, i:i + 2048].float() @ k[0, 0].float().T, -1)
        out.append(p @ v[0, 0].float())
    return torch.cat(out)


print(torch.__version__, torch.cuda.get_device_name(0), "cuDNN", torch.backends.cudnn.version())
for name, N, S in (("cityscapes 1024x2048 T=2", 32768, 65536), ("camvid 720x960 T=4", 10800, 43200)):
    h = torch.float16
    q = (torch.randn(1, 1, N, 64, device="cuda") * 0.25).to(h)
    k = (torch.randn(1, 1, S, 64, device="cuda") * 0.25).to(h)
    v = torch.randn(1, 1, S, 256, device="cuda").to(h)
    ref = reference(q, k, v)
    flop = 2 * N * S * (64 + 256)
    qp, kp = F.pad(q, (0, 192)), F.pad(k, (0, 192))
    q4, k4 = q.expand(1, 4, N, 64).contiguous(), k.expand(1, 4, S, 64).contiguous()
    v4 = v[0, 0].view(S, 4, 64).permute(1, 0, 2)[None].contiguous()
    q2, k2 = F.pad(q, (0, 64)).expand(1, 2, N, 128).contiguous(), F.pad(k, (0, 64)).expand(1, 2, S, 128).contiguous()
    v2 = v[0, 0].view(S, 2, 128).permute(1, 0, 2)[None].contiguous()
    variants = {
        "flash, q/k padded to 256 (today)": ([SDPBackend.FLASH_ATTENTION], qp, kp, v, None),
        "efficient, unpadded": ([SDPBackend.EFFICIENT_ATTENTION], q, k, v, None),
        "cudnn, unpadded": ([SDPBackend.CUDNN_ATTENTION], q, k, v, None),
        "cudnn, q/k padded to 256": ([SDPBackend.CUDNN_ATTENTION], qp, kp, v, None),
        "flash, 4 heads of 64 (v split)": ([SDPBackend.FLASH_ATTENTION], q4, k4, v4, 4),
        "flash, 2 heads of 128 (q/k padded, v split)": ([SDPBackend.FLASH_ATTENTION], q2, k2, v2, 2),
    }
    print(f"\n{name}: N={N} S={S}, unpadded work {flop / 1e9:.0f} GFLOP")
    for label, (backends, a, b, c, heads) in variants.items():
        def run():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(a, b, c, scale=1.0)
        try:
            out = run()
        except RuntimeError as e:
            print(f"  {label:46s} not available: {str(e).splitlines()[0][:90]}")
            continue
        out = out[0].permute(1, 0, 2).reshape(N, 256) if heads else out[0, 0]
        err = (out.float() - ref).abs().max().item()
        ms = timed(run)
        print(f"  {label:46s} {ms:7.3f} ms  {flop / ms / 1e9:6.1f} TFLOP/s (unpadded work)  max|err| {err:.2e}")
