"""The TMA decode head and the auxiliary FCN head, in the official (mmseg) key layout."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Queries per attention chunk: bounds the score matrix to chunk x (T*h*w) instead of (h*w) x (T*h*w).
DEFAULT_QUERY_CHUNK = 1024


class ConvModule(nn.Module):
    """conv (no bias) -> BN -> ReLU, keys ``conv.*`` and ``bn.*`` as in mmcv."""

    def __init__(self, cin, cout, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SequenceConv(nn.ModuleList):
    """One ConvModule per memory slot: slot i has its own weights (keys ``{i}.conv.*``)."""

    def __init__(self, cin, cout, kernel_size, memory_frames):
        super().__init__([ConvModule(cin, cout, kernel_size) for _ in range(memory_frames)])

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [m(x) for m, x in zip(self, xs)]


def encoder(cin, cout, memory_frames=None):
    """1x1 then 3x3 ConvModule; per-slot weights when ``memory_frames`` is given."""
    if memory_frames is None:
        return nn.Sequential(ConvModule(cin, cout, 1), ConvModule(cout, cout, 3))
    return nn.Sequential(SequenceConv(cin, cout, 1, memory_frames), SequenceConv(cout, cout, 3, memory_frames))


def memory_read(query_key: torch.Tensor, memory_keys: Sequence[torch.Tensor],
                memory_values: Sequence[torch.Tensor], query_chunk: int | None = None, fused: bool = False):
    """Official MemoryModule (``matmul_norm=False``): softmax(q . k) over all T*h*w memory positions, no
    1/sqrt(C) scaling; positions are flattened slot-major, then row, then column.

    The queries are processed ``query_chunk`` at a time (None: the default 1024; 0: all at once): each
    query's softmax is independent of the others, so chunking changes peak memory, not the result.
    ``fused``: use torch's fused attention kernel where one accepts the inputs (see :func:`fused_read`).
    """
    b, ck, h, w = query_key.shape
    keys = slot_major(memory_keys)                                                   # B, Ck, T*h*w
    values = slot_major(memory_values).transpose(1, 2)                               # B, T*h*w, Cv
    queries = query_key.flatten(2).transpose(1, 2)                                   # B, h*w, Ck
    if fused:
        read = fused_read(queries, keys, values)
        if read is not None:
            return read.transpose(1, 2).reshape(b, values.shape[2], h, w)
    n = h * w
    chunk = DEFAULT_QUERY_CHUNK if query_chunk is None else query_chunk
    step = n if chunk <= 0 or chunk >= n else chunk
    reads = [_softmax(torch.bmm(queries[:, s:s + step], keys)) @ values for s in range(0, n, step)]
    read = reads[0] if len(reads) == 1 else torch.cat(reads, dim=1)                  # B, h*w, Cv
    return read.transpose(1, 2).reshape(b, values.shape[2], h, w)


def read_weights(query_key: torch.Tensor, memory_keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """The read's attention weights ``[B, h*w, T*h*w]`` (rows: query positions; columns: memory positions
    flattened like :func:`memory_read`'s), whole and unchunked: what the values are averaged with, for
    analysis (``training/read_locality.py``)."""
    keys = slot_major(memory_keys)
    return _softmax(torch.bmm(query_key.flatten(2).transpose(1, 2), keys))


def place_read(query_key: torch.Tensor, memory_keys: Sequence[torch.Tensor],
               memory_values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``place_read`` extension (not in the paper): each query position reads the T memory slots at its
    own place only, mixed by a softmax over the slots of q . k there. The official read ranks all T*h*w
    positions by content, so a position whose current view was destroyed (a dropped region, glare) has no
    way to ask for what was at its place; this read is that way. ``[B,Ck,h,w]`` query key, T keys and T
    values -> ``[B,Cv,h,w]``; cost O(T*h*w*(Ck+Cv)), nothing next to the official read."""
    # The slots are the official read's slot-major concatenation (the same nodes, which ONNX Runtime computes
    # once) viewed as [B, C, T, h, w], not a stack of their own: a stack copies every key and value again.
    # The logits stay one Mul -> ReduceSum -> Softmax chain (the calibration keeps it float32 by structure, as
    # it keeps the official read's).
    b, ck, h, w = query_key.shape
    T = len(memory_keys)
    keys = slot_major(memory_keys).view(b, ck, T, h, w)
    scores = (query_key[:, :, None] * keys).sum(1)                                  # B, T, h, w
    weights = _softmax(scores, dim=1)
    values = slot_major(memory_values).view(b, -1, T, h, w)
    return (weights[:, None] * values).sum(2)                                        # B, Cv, h, w


def slot_major(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """T tensors ``[B, C, h, w]`` -> ``[B, C, T*h*w]``: memory positions flattened slot-major, then row, then
    column (the order of the official read's memory)."""
    return torch.cat([t.flatten(2) for t in tensors], dim=2)


def _softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over memory positions, in float32 for half inputs (the official read sums T*h*w terms)."""
    if scores.dtype == torch.float32:
        return torch.softmax(scores, dim=dim)
    return torch.softmax(scores, dim=dim, dtype=torch.float32).to(scores.dtype)


def fused_read(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """softmax(queries . keys) . values (``[B,N,Ck]``, ``[B,Ck,S]``, ``[B,S,Cv]`` -> ``[B,N,Cv]``) through
    ``scaled_dot_product_attention`` with scale 1, restricted to the fused kernels: the N x S score matrix is
    never materialised (4 GB in fp16 at 1024x2048, T=2). None where no fused kernel takes these inputs (the
    CPU, or head sizes a kernel does not support): the caller then reads in chunks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not queries.is_cuda:
        return None  # torch has no CPU fused kernel for a value width other than the key width
    q, k, v = queries[:, None], keys.transpose(1, 2)[:, None], values[:, None]
    ck, cv = q.shape[-1], v.shape[-1]
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    if dtype in (torch.float16, torch.bfloat16) and ck < cv <= 256:
        # FlashAttention wants one width for q, k and v: zero-padding q and k to the value width leaves every
        # q.k unchanged, and on an H100 it reads 1.7-2x faster than the efficient kernel at the official sizes.
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = F.scaled_dot_product_attention(F.pad(q, (0, cv - ck)), F.pad(k, (0, cv - ck)),
                                                     v.contiguous(), scale=1.0)
            return out[:, 0]
        except RuntimeError:  # no flash kernel here (e.g. an older GPU): the general choice below
            pass
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=1.0)
    except RuntimeError:  # "No available kernel": raised before any launch, so nothing ran
        return None
    return out[:, 0]


class TMAHead(nn.Module):
    def __init__(self, in_channels, memory_frames, key_channels, value_channels, channels, num_classes,
                 aggregation="concat", dropout=0.1, query_chunk=None, place_read=False):
        super().__init__()
        self.memory_frames = memory_frames
        self.aggregation = aggregation
        self.query_chunk = query_chunk
        # Registration order follows the official checkpoints' key order.
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.memory_key_conv = encoder(in_channels, key_channels, memory_frames)
        self.memory_value_conv = encoder(in_channels, value_channels, memory_frames)
        self.query_key_conv = encoder(in_channels, key_channels)
        self.query_value_conv = encoder(in_channels, value_channels)
        agg_channels = value_channels * 2 if aggregation == "concat" else value_channels
        self.bottleneck = ConvModule(agg_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        # place_read: the own-place read enters the bottleneck before its ReLU through a 1x1 conv that starts
        # at zero, so a model given the extension computes exactly what it computed without it.
        self.place_proj = nn.Conv2d(value_channels, channels, 1) if place_read else None
        if self.place_proj is not None:
            zero_place_proj(self)

    def encode_query(self, feat):
        return self.query_key_conv(feat), self.query_value_conv(feat)

    def encode_memory(self, feats: Sequence[torch.Tensor]):
        """``feats[i]`` is the backbone output of memory slot i (frame t-T+i, oldest first)."""
        if len(feats) != self.memory_frames:
            raise ValueError(f"expected {self.memory_frames} memory frames, got {len(feats)}")
        return self.memory_key_conv(feats), self.memory_value_conv(feats)

    def encode_all_slots(self, feat):
        """One frame's memory key/value under every slot's weights: ``[B, T, C, h, w]`` each."""
        feats = [feat] * self.memory_frames
        keys, values = self.encode_memory(feats)
        return torch.stack(keys, 1), torch.stack(values, 1)

    def decode(self, query_key, query_value, memory_keys, memory_values):
        read = memory_read(query_key, memory_keys, memory_values, self.query_chunk)
        if self.aggregation == "concat":
            x = torch.cat([query_value, read], dim=1)  # query first, as in the official head
        else:
            x = query_value + read
        if self.place_proj is None:
            x = self.bottleneck(x)
        else:
            place = self.place_proj(place_read(query_key, memory_keys, memory_values))
            x = F.relu(self.bottleneck.bn(self.bottleneck.conv(x)) + place)
        return self.conv_seg(self.dropout(x))

    def forward(self, feat, memory_feats):
        qk, qv = self.encode_query(feat)
        mk, mv = self.encode_memory(memory_feats)
        return self.decode(qk, qv, mk, mv)


def zero_place_proj(head: TMAHead) -> None:
    """Start the place read's projection at zero: the head then computes exactly the official TMA head."""
    nn.init.zeros_(head.place_proj.weight)
    nn.init.zeros_(head.place_proj.bias)


class FCNHead(nn.Module):
    """Auxiliary head on layer3 (training only): ConvModule 3x3 -> dropout -> 1x1 conv_seg."""

    def __init__(self, in_channels, channels, num_classes, dropout=0.1):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))
