"""The frame's way in and out of ``tmanet run`` and the other commands: frame sources and result sinks
(:mod:`.video`: video files, image folders, ``.npy``; :mod:`.mcap`, :mod:`.rosbag` and :mod:`.driving_logs`:
ROS bags; :mod:`.ros_images`: ROS image messages), the reading and writing threads (:mod:`.threads`) and the
outputs of a run (:mod:`.run_outputs`). Core code: it imports no feature package.
"""
