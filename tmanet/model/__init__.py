"""TMANet in PyTorch: backbone, TMA head, the deployment split and the reference inference."""
from .split import FrameEncoder, MemoryHead, fold_batchnorms
from .tmanet import FrameResult, TMANet

__all__ = ["TMANet", "FrameEncoder", "MemoryHead", "FrameResult", "fold_batchnorms"]
