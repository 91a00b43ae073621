"""Training-side data for TMANet: synthetic street-scene clips and loaders for the official
Cityscapes-video / CamVid-video layouts (``tmanet.training.synthetic``, ``tmanet.training.datasets``).

Kept import-free on purpose so that ``import tmanet.training`` never pulls Pillow or torch.
"""
