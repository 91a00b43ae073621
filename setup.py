"""tmanet-trt: TMANet from a PyTorch checkpoint to streaming ONNX Runtime / TensorRT engines.

The top-level folders are the toolkit's subpackages; they are mapped into the ``tmanet`` namespace
(``export/`` -> ``tmanet.export`` ...) next to the small core package ``tmanet/``.
"""
import re
from pathlib import Path

from setuptools import setup

# One version, tmanet.__version__ (what `tmanet --version` prints).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "tmanet" / "__init__.py").read_text(),
                    re.M).group(1)

SUBPACKAGES = ("export", "engines", "runtime", "training", "calibration")

setup(
    name="tmanet-trt",
    version=VERSION,
    description="TMANet video segmentation: checkpoints -> split ONNX -> TensorRT, with a streaming runtime",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["tmanet", "tmanet.io", "tmanet.model", "tmanet.runtime.backends"] + [f"tmanet.{p}" for p in SUBPACKAGES],
    package_dir={"tmanet": "tmanet", **{f"tmanet.{p}": p for p in SUBPACKAGES}},
    package_data={"tmanet": ["data/*"], "tmanet.runtime": ["ros2.launch.py"]},
    install_requires=[
        "torch>=2.4",  # CPU machines: requirements/cpu.txt pins 2.13.0 (make does it)
        "numpy>=1.24",
        "onnx>=1.17",
        "onnxscript>=0.2",
        "onnxruntime>=1.20",
        "av>=12",
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # tmanet bench --plot (Agg backend, no display needed)
        # ROS 2 bags (MCAP) in and out of `tmanet run`, without a ROS installation (pure Python + zstd/lz4).
        "mcap>=1.2",
        "mcap-ros2-support>=0.5",
        # Pure Python; NVIDIA's loaders for TensorRT builds (tensorrt itself imported lazily) and what
        # ModelOpt AutoCast runs its reference inference with.
        # 0.49.22: progress_monitor (0.49.0 has none) and no config.int8_calibrator read (TensorRT 11 lacks it).
        "polygraphy>=0.49.22",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "openvino>=2026.4; platform_machine == 'x86_64'"],
        # The openvino backend (x86 CPUs; the tests run it, so the test extra brings it there).
        "openvino": ["openvino>=2026.4"],
        # ModelOpt's ONNX tools without its [onnx] extra (that pulls onnxruntime-gpu + cupy); onnxslim and lief
        # are what modelopt.onnx needs to import. Pinned set: requirements/quant.txt.
        "quant": ["nvidia-modelopt", "onnx-graphsurgeon", "onnxconverter-common", "ml_dtypes", "onnxslim", "lief"],
        "tensorrt": ["tensorrt"],
        # Triton serving: the client. The server is the NGC Triton container's tritonserver, or the binary in
        # nvidia-pytriton installed with --no-deps (requirements/tritonserver.txt; its dependencies pin numpy<2).
        "serve": ["tritonclient[grpc,http]"],
        # ROS 2 .db3 and ROS 1 .bag input of `tmanet run` (MCAP needs only the required mcap packages).
        "rosbags": ["rosbags>=0.10"],
        # `tmanet batch`: many recordings on Ray actors (an embedded local Ray, or a cluster).
        "batch": ["ray>=2.50"],
    },
    entry_points={
        "console_scripts": ["tmanet=tmanet.cli:main"],
        # The runtime's backends (tmanet.runtime.backends.registry): each one class in its own module.
        "tmanet.backends": [
            "ort = tmanet.runtime.backends.ort:OrtBackend",
            "torch = tmanet.runtime.backends.torch:TorchBackend",
            "trt = tmanet.engines.backend:TrtBackend",
            "openvino = tmanet.runtime.backends.openvino:OpenVinoBackend",
        ],
    },
)
