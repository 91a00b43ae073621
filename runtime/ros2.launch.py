"""ROS 2 launch file of the tmanet segmentation node (``tmanet.runtime.ros2``), one camera:

    ros2 launch $(python -c "import tmanet.runtime, pathlib; print(pathlib.Path(tmanet.runtime.__file__).parent)")/ros2.launch.py \
        export_dir:=/path/to/export image:=/cam/front/image_raw

Every node parameter is a launch argument (defaults: the node's); ``image`` is the camera topic remapped to
``~/in/image``; the node publishes ``~/out/mask``, ``~/out/color_mask`` and, latched, ``~/out/label_info``.
The node runs in the Python environment that has tmanet (``python3`` on PATH, or the ``python`` argument).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration

# The node's parameters and their defaults (tmanet.runtime.ros2.PARAMETERS; a test keeps them equal).
PARAMETERS = {"export_dir": "", "backend": "ort", "device": "cpu", "max_gap": "1.0", "resize": "false",
              "compressed": "false"}


def generate_launch_description():
    arguments = [DeclareLaunchArgument(name, default_value=default) for name, default in PARAMETERS.items()]
    arguments += [DeclareLaunchArgument("image", default_value="/camera/image_raw",
                                        description="camera image topic (CompressedImage with compressed:=true)"),
                  DeclareLaunchArgument("python", default_value="python3")]
    command = [LaunchConfiguration("python"), "-m", "tmanet.runtime.ros2", "--ros-args",
               "-r", ["~/in/image:=", LaunchConfiguration("image")]]
    for name in PARAMETERS:
        command += ["-p", [f"{name}:=", LaunchConfiguration(name)]]
    return LaunchDescription(arguments + [ExecuteProcess(cmd=command, output="screen")])
