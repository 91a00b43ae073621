"""tmanet.training: training and evaluation of TMANet: synthetic street-scene clips (``synthetic``), loaders for
the official Cityscapes-video / CamVid-video layouts (``datasets``, ``data``), the trainer (``config``, ``recipe``,
``trainer``), evaluation (``evaluate``, ``eval_compare``), the ablation and the memory probes (``ablation``,
``memory_probe``, ``read_locality``).

Kept import-free on purpose so that ``import tmanet.training`` never pulls Pillow or torch.
"""
