"""Starts loop_closure_node and (optionally) verifier_node.

    ros2 launch megaloc_ros loop_closure.launch.py image_topic:=/camera/image_raw \
        image_transport:=compressed map_path:=$HOME/maps/office.map namespace:=robot1

Every node setting comes from ``params_file``; an argument given here overrides it, one left
out (empty) keeps the file's value. Without `ros2 launch`, `megaloc-ros run --params
config/loop_closure.yaml` starts the same nodes in one process.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

# node -> the parameters a launch argument of the same name sets (one name per setting)
PARAMETERS = {
    "loop_closure_node": ("image_topic", "image_transport", "encoder.model_path", "map_path", "odom_topic",
                          "depth_topic"),
    "verifier_node": ("camera_info_topic", "map_path"),
    "pose_graph_node": ("odom_topic", "map_path"),
    "rtabmap_adapter": ("rtabmap_namespace",),
    "lio_sam_adapter": (),
}
# backend argument -> the node that takes verified loops to it
BACKENDS = {"none": None, "gtsam": "pose_graph_node", "rtabmap": "rtabmap_adapter", "lio_sam": "lio_sam_adapter"}


def _node(context, name: str, namespace: str, params_file: str):
    overrides = {}
    for parameter in PARAMETERS[name]:
        value = LaunchConfiguration(parameter).perform(context)
        if value:  # empty: keep the parameters file's value
            overrides[parameter] = value
    return Node(package="megaloc_ros", executable=name, name=name, namespace=namespace, output="screen",
                emulate_tty=True, parameters=[params_file] + ([overrides] if overrides else []))


def _nodes(context):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    namespace, params_file = arg("namespace"), arg("params_file")
    nodes = [_node(context, "loop_closure_node", namespace, params_file)]
    if arg("use_verifier").lower() in ("true", "1", "yes"):
        # verifier_node reads loop_closure_node/keyframes and loop_closure_node/retrieved
        # (relative names, so both stay inside the namespace).
        nodes.append(_node(context, "verifier_node", namespace, params_file))
    backend = BACKENDS[arg("backend")]
    if backend:  # it reads verifier_node/loop_closures (relative: inside the namespace)
        nodes.append(_node(context, backend, namespace, params_file))
    return nodes


def generate_launch_description():
    keep = " (empty: the parameters file's value)"
    return LaunchDescription([
        DeclareLaunchArgument("params_file", description="ROS 2 parameters YAML of both nodes",
                              default_value=PathJoinSubstitution([FindPackageShare("megaloc_ros"), "config",
                                                                  "loop_closure.yaml"])),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of both nodes"),
        DeclareLaunchArgument("use_verifier", default_value="true",
                              description="false: the back end consumes loop_closure_node/candidates"),
        DeclareLaunchArgument("image_topic", default_value="", description="camera topic" + keep),
        DeclareLaunchArgument("image_transport", default_value="", choices=["", "raw", "compressed"],
                              description="raw: sensor_msgs/Image; compressed: <image_topic>/compressed" + keep),
        DeclareLaunchArgument("encoder.model_path", default_value="",
                              description="exported encoder model (.onnx or OpenVINO .xml)" + keep),
        DeclareLaunchArgument("map_path", default_value="",
                              description="map file: loaded at start when it exists, saved on shutdown" + keep),
        DeclareLaunchArgument("backend", default_value="none", choices=list(BACKENDS),
                              description="where verified loops go: none (your own subscriber), gtsam "
                                          "(pose_graph_node), rtabmap (rtabmap_adapter), lio_sam (lio_sam_adapter)"),
        DeclareLaunchArgument("odom_topic", default_value="",
                              description="nav_msgs/Odometry: keyframe poses (loop_closure_node) and the "
                                          "pose graph's odometry (backend gtsam)" + keep),
        DeclareLaunchArgument("depth_topic", default_value="",
                              description="registered depth (16UC1 mm or 32FC1 m): metric loop transforms" + keep),
        DeclareLaunchArgument("rtabmap_namespace", default_value="",
                              description="backend rtabmap: RTAB-Map's namespace (add_link, mapData, info)" + keep),
        DeclareLaunchArgument("camera_info_topic", default_value="",
                              description="sensor_msgs/CameraInfo: intrinsics, so verified loops carry a "
                                          "transform" + keep),
        OpaqueFunction(function=_nodes),
    ])
