"""tmanet-trt: TMANet video segmentation from a PyTorch checkpoint to streaming ONNX Runtime / TensorRT."""
from .checkpoints import CheckpointError, load_model, save_checkpoint
from .model import FrameEncoder, FrameResult, MemoryHead, TMANet
from .presets import PRESETS, ModelConfig, get_preset

__version__ = "0.1.0"
__all__ = ["TMANet", "FrameEncoder", "MemoryHead", "FrameResult", "ModelConfig", "PRESETS", "get_preset",
           "load_model", "save_checkpoint", "CheckpointError"]
