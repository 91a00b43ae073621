"""ROS 2 image messages <-> numpy, shared by the MCAP path (``tmanet run --input X.mcap``) and the ROS 2 node.

Works on any object with the message's field names (``mcap_ros2``'s decoded messages, rclpy's
``sensor_msgs.msg`` classes, plain dicts), so nothing here needs a ROS installation. Input:
``sensor_msgs/msg/Image`` (rgb8, bgr8, rgba8, bgra8, mono8) and ``sensor_msgs/msg/CompressedImage`` (jpeg,
png). Output: mono8 class-id masks and rgb8 colour masks as the fields of a ``sensor_msgs/msg/Image`` with the
input's header (stamp and frame_id).
"""
from __future__ import annotations

import io

import numpy as np

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)

# The ros2msg schema texts (the message definitions with their dependencies, as rosbag2 records them).
_HEADER_DEFS = """
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""
LABEL_INFO = "vision_msgs/msg/LabelInfo"
MSGDEFS = {
    IMAGE: "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n"
           "uint32 step\nuint8[] data" + _HEADER_DEFS,
    COMPRESSED_IMAGE: "std_msgs/Header header\nstring format\nuint8[] data" + _HEADER_DEFS,
    # vision_msgs' class names of a segmentation, latched beside its masks (Foxglove and nodes read it).
    LABEL_INFO: "std_msgs/Header header\nvision_msgs/VisionClass[] class_map\nfloat32 threshold\n"
                "================================================================================\n"
                "MSG: vision_msgs/VisionClass\nuint16 class_id\nstring class_name" + _HEADER_DEFS,
}
# image_transport's transport names: a topic ending in one is a camera's image under that transport.
TRANSPORTS = ("compressed", "compressedDepth", "theora", "zstd", "ffmpeg")


def output_topic(image_topic: str, name: str) -> str:
    """Where an output of ``image_topic`` goes: ``<camera image topic>/<name>``, without the transport name of a
    compressed input (``/cam/image_raw/compressed`` -> ``/cam/image_raw/mask``)."""
    base, _, last = image_topic.rstrip("/").rpartition("/")
    return f"{base if last in TRANSPORTS and base else image_topic.rstrip('/')}/{name}"


def label_info_fields(class_names, header) -> dict:
    """The fields of a ``vision_msgs/msg/LabelInfo`` naming each class id of the masks."""
    return {"header": header, "class_map": [{"class_id": i, "class_name": str(n)} for i, n in enumerate(class_names)],
            "threshold": 0.0}

# Raw encodings: (channels, index of R, G, B in a pixel).
RAW_ENCODINGS = {"rgb8": (3, [0, 1, 2]), "bgr8": (3, [2, 1, 0]), "rgba8": (4, [0, 1, 2]),
                 "bgra8": (4, [2, 1, 0]), "mono8": (1, [0, 0, 0])}
COMPRESSED_FORMATS = ("jpeg", "png")


def field(msg, name):
    """A message field by name, from a message object or a dict."""
    return msg[name] if isinstance(msg, dict) else getattr(msg, name)


def stamp_seconds(header) -> float:
    stamp = field(header, "stamp")
    return int(field(stamp, "sec")) + int(field(stamp, "nanosec")) * 1e-9


def image_to_rgb(msg) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` of an Image or CompressedImage message (told apart by its ``format`` field);
    ValueError naming the supported encodings for any other."""
    compressed = "format" in msg if isinstance(msg, dict) else hasattr(msg, "format")
    return _decode_compressed(msg) if compressed else _decode_raw(msg)


def _decode_raw(msg) -> np.ndarray:
    encoding = str(field(msg, "encoding"))
    if encoding not in RAW_ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r} (supported: {', '.join(RAW_ENCODINGS)}, "
                         f"or CompressedImage {'/'.join(COMPRESSED_FORMATS)})")
    channels, rgb = RAW_ENCODINGS[encoding]
    h, w, step = int(field(msg, "height")), int(field(msg, "width")), int(field(msg, "step"))
    data = np.frombuffer(field(msg, "data"), np.uint8)
    if step < w * channels or data.size < step * h:
        raise ValueError(f"{encoding} image of {w}x{h} with step {step} holds {data.size} bytes, "
                         f"needs {max(step, w * channels) * h}")
    pixels = data[:step * h].reshape(h, step)[:, :w * channels].reshape(h, w, channels)
    return np.ascontiguousarray(pixels[..., rgb])


def _decode_compressed(msg) -> np.ndarray:
    from PIL import Image
    fmt = str(field(msg, "format")).lower()
    # image_transport writes e.g. "bgr8; jpeg compressed bgr8": the codec is what matters to a decoder.
    if not any(name in fmt for name in COMPRESSED_FORMATS + ("jpg",)):
        raise ValueError(f"unsupported compressed image format {fmt!r} (supported: "
                         f"{', '.join(COMPRESSED_FORMATS)})")
    try:
        with Image.open(io.BytesIO(bytes(field(msg, "data")))) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"cannot decode the {fmt!r} image ({e})") from None


def image_fields(pixels: np.ndarray, header) -> dict:
    """The fields of a ``sensor_msgs/msg/Image`` holding ``pixels`` (uint8 ``(H, W)`` -> mono8,
    ``(H, W, 3)`` -> rgb8) under ``header`` (the input's: same stamp and frame_id)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        encoding = "mono8"
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        encoding = "rgb8"
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3) uint8 pixels, got {pixels.shape}")
    h, w = pixels.shape[:2]
    return {"header": header, "height": h, "width": w, "encoding": encoding, "is_bigendian": 0,
            "step": pixels.strides[0], "data": pixels.tobytes()}
