"""A ROS 2 node around the streaming runtime (``python -m tmanet.runtime.ros2``), Autoware-style contract.

Subscribes ``~/in/image`` (``sensor_msgs/msg/Image``; ``sensor_msgs/msg/CompressedImage`` with the parameter
``compressed``), publishes ``~/out/mask`` (mono8 class ids) and ``~/out/color_mask`` (rgb8, the preset's
palette), both with the input's header, and once, latched (transient local), ``~/out/label_info``
(``vision_msgs/msg/LabelInfo``: the class names of the mask ids, where vision_msgs is installed). Parameters: ``export_dir`` (required), ``backend`` (ort), ``device``
(cpu), ``max_gap`` (seconds, 0 disables), ``resize``, ``compressed``. Each camera (the header's frame_id) is
its own stream, reset on a time gap.

All the work is in :class:`SegmentationNodeCore` (no ROS needed, tested with real CDR serialization); the
rclpy part below it only wires the subscription, the publishers and the parameters.
"""
from __future__ import annotations

import logging

from tmanet.io.ros_images import field, label_info_fields

from .camera_streams import CameraStreams, segment_image_message

log = logging.getLogger("tmanet")

PARAMETERS = {"export_dir": "", "backend": "ort", "device": "cpu", "max_gap": 1.0, "resize": False,
              "compressed": False}


class SegmentationNodeCore:
    """Image message in, mask (and colour mask) Image fields out; cameras told apart by header.frame_id."""

    def __init__(self, export_dir: str, backend: str = "ort", device: str = "cpu", max_gap: float = 1.0,
                 resize: bool = False):
        from .segmenter import StreamingSegmenter
        if not export_dir:
            raise ValueError("the parameter export_dir is required (an export directory of `tmanet export`)")
        self.streams = CameraStreams(lambda: StreamingSegmenter.open(
            export_dir, backend=backend, device=device, max_gap=max_gap or None, resize=resize))

    def label_info(self, stamp: dict | None = None) -> dict:
        """The fields of the ``vision_msgs/msg/LabelInfo`` the node latches on ``~/out/label_info``."""
        header = {"stamp": stamp or {"sec": 0, "nanosec": 0}, "frame_id": ""}
        return label_info_fields(self.streams.class_names, header)

    def on_image(self, msg, color: bool = True) -> tuple[dict, dict | None]:
        camera = field(field(msg, "header"), "frame_id")
        return segment_image_message(self.streams, camera, msg, self.streams.palette if color else None)

    def close(self):
        self.streams.close()


def build_node(parameters: dict | None = None):  # pragma: no cover - needs rclpy (ROS 2); tests/test_mcap.py
    """The rclpy node (after ``rclpy.init()``); ``parameters`` override the declared ones (else ``--ros-args``)."""
    import array

    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image

    def to_ros(fields):  # array('B') is what rclpy keeps: from bytes it checks every element in Python
        return Image(**{**fields, "data": array.array("B", fields["data"])})

    class SegmentationNode(Node):
        def __init__(self):
            overrides = [Parameter(k, value=v) for k, v in (parameters or {}).items()]
            super().__init__("tmanet_segmentation", parameter_overrides=overrides)
            p = {name: self.declare_parameter(name, default).value for name, default in PARAMETERS.items()}
            self.core = SegmentationNodeCore(p["export_dir"], p["backend"], p["device"], p["max_gap"],
                                             p["resize"])
            self.mask_pub = self.create_publisher(Image, "~/out/mask", 10)
            self.color_pub = self.create_publisher(Image, "~/out/color_mask", 10)
            self._latch_label_info()
            self.create_subscription(CompressedImage if p["compressed"] else Image, "~/in/image",
                                     self.on_image, 10)

        def _latch_label_info(self):
            """The class names, once, on a transient-local topic: late subscribers get them too."""
            try:
                from vision_msgs.msg import LabelInfo, VisionClass
            except ImportError:
                self.get_logger().warning("vision_msgs is not installed: no ~/out/label_info (class names)")
                return
            from rclpy.qos import DurabilityPolicy, QoSProfile
            latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.label_pub = self.create_publisher(LabelInfo, "~/out/label_info", latched)
            fields = self.core.label_info()
            msg = LabelInfo(class_map=[VisionClass(**c) for c in fields["class_map"]], threshold=fields["threshold"])
            msg.header.stamp = self.get_clock().now().to_msg()
            self.label_pub.publish(msg)

        def on_image(self, msg):
            try:  # colour masks only while someone listens
                mask, color = self.core.on_image(msg, color=self.color_pub.get_subscription_count() > 0)
            except ValueError as e:  # a bad image: say so, keep serving the next ones
                self.get_logger().error(str(e))
                return
            self.mask_pub.publish(to_ros(mask))
            if color is not None:
                self.color_pub.publish(to_ros(color))

        def destroy_node(self):
            self.core.close()
            super().destroy_node()

    return SegmentationNode()


def main(argv=None):
    try:
        import rclpy
    except ImportError:
        raise SystemExit("tmanet.runtime.ros2 needs rclpy, which comes with ROS 2: source its setup "
                         "(e.g. /opt/ros/jazzy/setup.bash) in the Python environment that has tmanet") from None
    rclpy.init(args=argv)
    node = build_node()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":  # pragma: no cover
    main()
