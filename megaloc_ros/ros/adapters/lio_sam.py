"""``lio_sam_adapter``: the verifier's loops -> LIO-SAM's external loop-closure input.

Subscribes   <loops_topic>   megaloc_ros/LoopClosureArray (default verifier_node/loop_closures)
Publishes    <output_topic>  std_msgs/Float64MultiArray, one message per verified loop:
                             data = [query stamp, match stamp] in seconds (LIO-SAM's
                             ``lio_loop/loop_closure_detection``: data[0] the current keyframe's
                             time, data[1] the earlier one's)

LIO-SAM looks up the lidar keyframes nearest to both stamps and checks the pair with its own
ICP, so only the stamps travel; loops without a metric transform are as useful as the others.
Unverified loops (``verified`` false: the detector's raw candidates) are not forwarded unless
``forward_unverified`` is set. Parameters: loops_topic, output_topic, forward_unverified.
"""
from __future__ import annotations

from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout

from megaloc_ros.msg import LoopClosureArray

NODE_NAME = "lio_sam_adapter"
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def stamp_seconds(t) -> float:
    """builtin_interfaces/Time -> float seconds, as LIO-SAM reads its stamps."""
    return float(t.sec) + float(t.nanosec) * 1e-9


def loop_message(lc) -> Float64MultiArray:
    """One LoopClosure -> LIO-SAM's [t_query, t_match]."""
    layout = MultiArrayLayout(dim=[MultiArrayDimension(label="query_match_stamps", size=2, stride=2)])
    return Float64MultiArray(layout=layout, data=[stamp_seconds(lc.query_stamp), stamp_seconds(lc.match_stamp)])


class LioSamAdapter(Node):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.loops_topic = self.declare_parameter("loops_topic", "verifier_node/loop_closures").value
        self.output_topic = self.declare_parameter("output_topic", "lio_loop/loop_closure_detection").value
        self.forward_unverified = bool(self.declare_parameter("forward_unverified", False).value)
        self.counts = {"received": 0, "forwarded": 0, "unverified": 0}
        self._pub = self.create_publisher(Float64MultiArray, self.output_topic, RELIABLE)
        self._sub = self.create_subscription(LoopClosureArray, self.loops_topic, self._on_loops, RELIABLE)
        self.get_logger().info(f"forwarding loops from {self._sub.topic_name} to {self._pub.topic_name}")

    def _on_loops(self, msg: LoopClosureArray) -> None:
        for lc in msg.loops:
            self.counts["received"] += 1
            if not lc.verified and not self.forward_unverified:
                self.counts["unverified"] += 1
                continue
            self._pub.publish(loop_message(lc))
            self.counts["forwarded"] += 1


def main(args=None) -> None:
    """`ros2 run megaloc_ros lio_sam_adapter`."""
    from megaloc_ros.ros.managed_node import spin_single
    spin_single(LioSamAdapter, args)


if __name__ == "__main__":
    main()
