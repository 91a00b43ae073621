"""The two deployment graphs, built from a loaded TMANet with BatchNorm folded into the convolutions.

FrameEncoder (once per frame): uint8 RGB ``[B,H,W,3]`` -> query key/value and the frame's memory key/value
under every slot's weights. The 1+T key and value encoders all read the same backbone feature, so their
first 1x1 convs are fused into one conv and their 3x3 convs into two grouped convs (same arithmetic, one
kernel launch instead of 2(1+T)).

MemoryHead (once per frame): query + T memory slots -> memory read -> aggregation -> bottleneck (+ the
place read's projection, where the model has one) -> conv_seg -> bilinear resize to the input size -> argmax.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .tma_head import DEFAULT_QUERY_CHUNK, ConvModule, memory_read, place_read


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv -> BN (eval statistics) as one conv with bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm2d registered right after a Conv2d in the same parent (the layout of
    ResNet blocks, the stem, downsample and ConvModule); the BN becomes Identity."""
    for child in module.children():
        fold_batchnorms(child)
    names = list(module._modules)
    for prev, name in zip(names, names[1:]):
        conv, bn = module._modules[prev], module._modules[name]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module._modules[prev] = fold_conv_bn(conv, bn)
            module._modules[name] = nn.Identity()
    return module


def _folded(cm: ConvModule) -> nn.Conv2d:
    return fold_conv_bn(cm.conv, cm.bn)


def _stack_convs(convs: list[nn.Conv2d], groups: int) -> nn.Conv2d:
    """Convs over the same input (groups=1) or over consecutive channel groups, as one conv."""
    first = convs[0]
    cin = first.in_channels * groups
    fused = nn.Conv2d(cin, sum(c.out_channels for c in convs), first.kernel_size, padding=first.padding,
                      groups=groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([c.weight for c in convs]))
        fused.bias.copy_(torch.cat([c.bias for c in convs]))
    return fused


class FrameEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        cfg = model.config
        head = model.decode_head
        self.memory_frames = T = cfg.memory_frames
        self.key_channels, self.value_channels = cfg.key_channels, cfg.value_channels
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())
        self.backbone = fold_batchnorms(copy.deepcopy(model.backbone)).eval()
        # Branch order: query first, then memory slots 0..T-1 (the order of the outputs).
        key_branches = [head.query_key_conv] + [[head.memory_key_conv[0][i], head.memory_key_conv[1][i]]
                                                for i in range(T)]
        value_branches = [head.query_value_conv] + [[head.memory_value_conv[0][i], head.memory_value_conv[1][i]]
                                                    for i in range(T)]
        self.reduce = _stack_convs([_folded(b[0]) for b in key_branches + value_branches], groups=1)
        self.key_conv = _stack_convs([_folded(b[1]) for b in key_branches], groups=T + 1)
        self.value_conv = _stack_convs([_folded(b[1]) for b in value_branches], groups=T + 1)
        self.eval()

    def forward(self, frames: torch.Tensor):
        """uint8 ``[B,H,W,3]`` -> query_key ``[B,Ck,h,w]``, query_value ``[B,Cv,h,w]``,
        memory_key ``[B,T,Ck,h,w]``, memory_value ``[B,T,Cv,h,w]``."""
        # Cast before the transpose: TensorRT handles uint8 only at the I/O boundary. Normalised in float32,
        # then in the weights' dtype (the torch backend's half precision; nothing in an fp32 export).
        x = ((frames.float().permute(0, 3, 1, 2) - self.mean.float()) / self.std.float()).to(self.mean.dtype)
        feat = self.backbone(x)[1]
        reduced = F.relu(self.reduce(feat))
        n_key = (self.memory_frames + 1) * self.key_channels
        keys = F.relu(self.key_conv(reduced[:, :n_key]))
        values = F.relu(self.value_conv(reduced[:, n_key:]))
        b, _, h, w = keys.shape
        keys = keys.reshape(b, self.memory_frames + 1, self.key_channels, h, w)
        values = values.reshape(b, self.memory_frames + 1, self.value_channels, h, w)
        return keys[:, 0], values[:, 0], keys[:, 1:], values[:, 1:]


class MemoryHead(nn.Module):
    def __init__(self, model, out_size, query_chunk=None):
        super().__init__()
        cfg = model.config
        head = model.decode_head
        self.memory_frames = cfg.memory_frames
        self.aggregation = cfg.aggregation
        self.align_corners = cfg.align_corners
        self.out_size = tuple(int(s) for s in out_size)
        self.query_chunk = DEFAULT_QUERY_CHUNK if query_chunk is None else query_chunk  # 0: unchunked
        # Fused attention kernel (CUDA): set by the runtime's torch backend; never in an ONNX export, whose
        # graph keeps the portable chunked matmul/softmax.
        self.fused_attention = False
        self.bottleneck = _folded(head.bottleneck)
        self.place_proj = None if head.place_proj is None else copy.deepcopy(head.place_proj)
        self.conv_seg = copy.deepcopy(head.conv_seg)
        self.eval()

    def forward(self, query_key, query_value, *memory):
        """``memory`` = memory_key_0..T-1 then memory_value_0..T-1 (slot i = frame t-T+i).
        Returns mask ``[B,H,W]`` uint8 and logits ``[B,C,H,W]`` float32 at the input size."""
        T = self.memory_frames
        if len(memory) != 2 * T:
            raise ValueError(f"expected {2 * T} memory tensors (T keys then T values), got {len(memory)}")
        fused = self.fused_attention and not torch.onnx.is_in_onnx_export()
        read = memory_read(query_key, memory[:T], memory[T:], self.query_chunk, fused=fused)
        x = torch.cat([query_value, read], 1) if self.aggregation == "concat" else query_value + read
        x = self.bottleneck(x)
        if self.place_proj is not None:
            x = x + self.place_proj(place_read(query_key, memory[:T], memory[T:]))
        logits = self.conv_seg(F.relu(x))
        logits = F.interpolate(logits, size=self.out_size, mode="bilinear", align_corners=self.align_corners)
        # argmax -> float -> uint8: TensorRT parses ArgMax as TopK with int64 indices, and its uint8 converts
        # only to and from float32/float16, so the mask takes the documented path (exact: class ids < 256).
        return logits.argmax(1).to(logits.dtype).to(torch.uint8), logits
