"""Starts loop_closure_node and (optionally) verifier_node.

    ros2 launch megaloc_ros loop_closure.launch.py image_topic:=/camera/image_raw \
        image_transport:=compressed map_path:=$HOME/maps/office.map namespace:=robot1

Without `ros2 launch`, `megaloc-ros run --params config/loop_closure.yaml` starts the same nodes
in one process. Arguments left empty keep the value of the parameters file.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _nodes(context):
    arg = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    namespace = arg("namespace")
    params_file = arg("params_file")
    loop_closure_params = {"image_topic": arg("image_topic"), "image_transport": arg("image_transport")}
    verifier_params = {}
    if arg("encoder.model_path"):
        loop_closure_params["encoder.model_path"] = arg("encoder.model_path")
    if arg("camera_info_topic"):
        verifier_params["camera_info_topic"] = arg("camera_info_topic")
    if arg("map_path"):
        loop_closure_params["map_path"] = arg("map_path")
        verifier_params["map_path"] = arg("map_path")
    nodes = [Node(package="megaloc_ros", executable="loop_closure_node", name="loop_closure_node",
                  namespace=namespace, output="screen", emulate_tty=True,
                  parameters=[params_file, loop_closure_params])]
    if arg("use_verifier").lower() in ("true", "1", "yes"):
        # verifier_node reads loop_closure_node/keyframes and loop_closure_node/retrieved
        # (relative names, so both stay inside the namespace).
        nodes.append(Node(package="megaloc_ros", executable="verifier_node", name="verifier_node",
                          namespace=namespace, output="screen", emulate_tty=True,
                          parameters=[params_file, verifier_params]))
    return nodes


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("image_topic", default_value="image_raw", description="camera topic"),
        DeclareLaunchArgument("image_transport", default_value="raw", choices=["raw", "compressed"],
                              description="raw: sensor_msgs/Image; compressed: <image_topic>/compressed"),
        DeclareLaunchArgument("encoder.model_path", default_value="",
                              description="exported encoder ONNX (empty: MegaLoc when exported, else the offline backbone)"),
        DeclareLaunchArgument("params_file", description="ROS 2 parameters YAML",
                              default_value=PathJoinSubstitution([FindPackageShare("megaloc_ros"), "config",
                                                                  "loop_closure.yaml"])),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of both nodes"),
        DeclareLaunchArgument("use_verifier", default_value="true",
                              description="false: the back end consumes loop_closure_node/candidates"),
        DeclareLaunchArgument("map_path", default_value="",
                              description="map file: loaded at start when it exists, saved on shutdown"),
        DeclareLaunchArgument("camera_info_topic", default_value="",
                              description="sensor_msgs/CameraInfo: intrinsics, so verified loops carry a transform"),
        OpaqueFunction(function=_nodes),
    ])
