"""The paper's training recipe (ICIP 2021, section 3.1) as pieces: the poly learning-rate policy, the loss,
mmseg's from-scratch initialisation, the optimiser, the memory order of the training samples and one
optimisation step (:class:`Trainer`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tmanet.metrics import IGNORE_INDEX
from tmanet.model import TMANet
from tmanet.model.resnet import BasicBlock, Bottleneck
from tmanet.model.tma_head import zero_place_proj
from tmanet.slots import memory_frame_indices

from .config import check_memory_order


def poly_lr(iteration: int, max_iters: int, base_lr: float, power: float = 0.9, min_lr: float = 1e-4) -> float:
    """mmcv's poly policy: ``(base - min) * (1 - iter / max_iters) ** power + min``, ``iter`` counted from 0.
    A base lr below ``min_lr`` stays constant (the floor never raises it)."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    min_lr = min(min_lr, base_lr)
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr



def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy with ignore index 255, averaged over *all* pixels as mmseg 0.x does (ignored
    pixels count as zero loss), so a batch that is entirely ignored gives 0, not NaN. A per-pixel ``weight``
    ``[N,H,W]`` makes it the weighted mean (weights all 1: the plain mean)."""
    loss = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum()


def damage_weights(damage: torch.Tensor | None, damage_weight: float) -> torch.Tensor | None:
    """Per-pixel loss weights: ``damage_weight`` where a frame was destroyed, 1 elsewhere (None when the
    weight is 1 or the damage unknown: the plain loss)."""
    if damage is None or damage_weight == 1.0:
        return None
    return 1.0 + (float(damage_weight) - 1.0) * damage.float()



def init_from_scratch(model: TMANet) -> TMANet:
    """mmseg's initialisation for training without pretrained weights: Kaiming-normal (fan_out) convs, BN
    weight 1 / bias 0, the last BN of every residual block zeroed (each block starts as the identity, which
    lets a deep net train from scratch), and the classifiers ``conv_seg`` normal(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.backbone.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    heads = [model.decode_head] + ([model.auxiliary_head] if model.auxiliary_head is not None else [])
    for head in heads:
        nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(head.conv_seg.bias)
    if model.decode_head.place_proj is not None:
        zero_place_proj(model.decode_head)
    return model




def memory_frame_order(t: int, memory_frames: int, order: str = "oldest_first", start: int = 0) -> list[int]:
    """The frame each memory slot 0..T-1 reads for frame ``t`` of a clip that begins at ``start``, under
    ``order``; indices before ``start`` clamp to it (the warm-up rule)."""
    order = check_memory_order(order)
    official = memory_frame_indices(t, start, memory_frames)  # raises for t before start
    if order == "current":
        return [t] * memory_frames
    return official[::-1] if order == "newest_first" else official



def order_memory(image, memory, order: str = "oldest_first"):
    """Re-order a sample's memory given oldest first (``[T, ...]`` frames t-T..t-1, what the datasets
    yield) to ``order``: reversed for "newest_first", T copies of ``image`` for "current". numpy arrays or
    torch tensors; "oldest_first" returns ``memory`` itself."""
    order = check_memory_order(order)
    if order == "oldest_first":
        return memory
    if order == "newest_first":
        return memory.flip(0) if isinstance(memory, torch.Tensor) else np.ascontiguousarray(memory[::-1])
    if isinstance(image, torch.Tensor):
        return image.unsqueeze(0).expand(memory.shape[0], *image.shape).clone()
    return np.repeat(np.asarray(image)[None], len(memory), axis=0)



def unwrap(model) -> TMANet:
    return model.module if hasattr(model, "module") else model



@dataclass
class StepResult:
    loss: float
    decode_loss: float
    aux_loss: float



class Trainer:
    """One optimisation step of the recipe on a batch (``image``/``memory`` uint8 HWC, ``label`` int64,
    optionally ``damage`` bool: the destroyed pixels, weighted ``damage_weight`` in the loss)."""

    def __init__(self, model, optimizer, device, aux_weight: float = 0.4, amp: bool = False,
                 damage_weight: float = 1.0):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.aux_weight = aux_weight
        self.amp = amp
        self.damage_weight = float(damage_weight)  # loss weight of destroyed pixels (batches with "damage")

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        core = unwrap(self.model)
        dev = self.device
        image = core.normalize(batch["image"].to(dev, non_blocking=True))
        memory = core.normalize(batch["memory"].to(dev, non_blocking=True))
        label = batch["label"].to(dev, non_blocking=True)
        damage = batch.get("damage")
        weight = damage_weights(None if damage is None else damage.to(dev, non_blocking=True), self.damage_weight)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(image, memory)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        decode = segmentation_loss(logits.float(), label, weight)
        aux_loss = segmentation_loss(aux.float(), label, weight) if aux is not None else torch.zeros((), device=dev)
        return decode + self.aux_weight * aux_loss, decode, aux_loss

    def step(self, batch, lr: float | None = None) -> StepResult:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        loss, decode, aux = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepResult(float(loss.detach()), float(decode.detach()), float(aux.detach()))



def make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4) -> torch.optim.SGD:
    # mmseg's default: one group, weight decay on every parameter (BN included).
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
