"""`megaloc-ros run`: loop_closure_node and verifier_node in one process (what the launch file
starts), on a multi-threaded executor, until Ctrl-C; the maps are saved on exit.

    megaloc-ros run --params config/loop_closure.yaml [--image-topic /camera/image_raw]
                    [--compressed] [--map-path maps/office.map] [--no-verifier] [--namespace robot1]

Python API (stable; used by the evaluation's live replay and the demo)::

    from megaloc_ros.ros.runner import NodeSet, load_params
    with NodeSet(load_params("config/loop_closure.yaml"), namespace="", use_verifier=True) as nodes:
        pub = nodes.helper_node.create_publisher(Image, "image_raw", 10)  # same context/domain
        ...                                   # publish frames, subscribe to results
        nodes.wait_idle()                     # all queued frames, keyframes and candidates handled
        nodes.save_map("maps/run1.map")       # both nodes (map and <path>.verifier)

``NodeSet(params, namespace="", use_verifier=True, domain_id=None, encoder=None)``: ``params``
is a flat ``{name: value}`` dict given to both nodes (each takes the names it declares; see
config/loop_closure.yaml); ``domain_id`` a ROS domain of its own (default: ROS_DOMAIN_ID);
``encoder`` an already loaded encoder to share. Attributes: ``loop_closure``, ``verifier``
(None without verifier), ``helper_node`` (a plain node in the same context), ``context``,
``image_topic`` (the resolved camera topic, raw or ``.../compressed``). Counters of each node:
``nodes.loop_closure.stats.snapshot()`` (the values /diagnostics reports).
Leaving the ``with`` block stops the nodes (finishing queued frames), saves the maps when
``map_path`` is set, and shuts the context down.
"""
from __future__ import annotations

import argparse
import threading
import time
from typing import Any, Optional

from megaloc_ros.errors import MegalocError
from megaloc_ros.ros import params as P


def load_params(path: Optional[str], namespace: str = "") -> dict[str, Any]:
    """The parameters of both nodes from a ROS 2 YAML file (``/**`` and per-node sections)."""
    from megaloc_ros.settings import load_params_file
    if not path:
        return {}
    out = load_params_file(path, None, namespace)
    for node in (P.LOOP_CLOSURE_NODE, P.VERIFIER_NODE):
        out.update({k: v for k, v in load_params_file(path, node, namespace).items() if k not in out})
    return out


def _overrides(params: dict[str, Any], specs) -> list:
    from rclpy.parameter import Parameter
    names = {s.name: s for s in specs}
    out = []
    for k, v in params.items():
        if k not in names:
            continue
        if isinstance(names[k].default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        out.append(Parameter(k, value=v))
    return out


class NodeSet:
    """Both nodes in one rclpy context, spun by a MultiThreadedExecutor in a background thread."""

    def __init__(self, params: Optional[dict[str, Any]] = None, namespace: str = "", use_verifier: bool = True,
                 domain_id: Optional[int] = None, encoder=None, num_threads: int = 4):
        self.params = dict(params or {})
        self.namespace = namespace
        self.use_verifier = use_verifier
        self.domain_id = domain_id
        self.encoder = encoder
        self.num_threads = num_threads
        self.context = None
        self.loop_closure = None
        self.verifier = None
        self.helper_node = None
        self._executor = None
        self._thread: Optional[threading.Thread] = None

    def unknown_params(self) -> list[str]:
        """Names in ``params`` that neither node declares (typos)."""
        known = {s.name for specs in P.all_node_specs().values() for s in specs}
        return sorted(k for k in self.params if k not in known)

    def start(self) -> "NodeSet":
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        from megaloc_ros.ros.loop_closure_node import LoopClosureNode
        from megaloc_ros.ros.verifier_node import VerifierNode

        unknown = self.unknown_params()
        if unknown:
            raise MegalocError(f"unknown parameter(s) {', '.join(unknown)} (see config/loop_closure.yaml)")
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context, domain_id=self.domain_id, signal_handler_options=None)
        try:
            kw = dict(context=self.context, namespace=self.namespace)
            self.loop_closure = self._make(LoopClosureNode, P.loop_closure_specs(), encoder=self.encoder, **kw)
            if self.use_verifier:
                self.verifier = self._make(VerifierNode, P.verifier_node_specs(), **kw)
            self.helper_node = rclpy.create_node("megaloc_helper", **kw)
            self._executor = MultiThreadedExecutor(num_threads=self.num_threads, context=self.context)
            for n in self.nodes():
                self._executor.add_node(n)
            self._executor.add_node(self.helper_node)
            self._thread = threading.Thread(target=self._spin, name="megaloc_executor", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _make(self, cls, specs, **kw):
        from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
        try:
            node = cls(parameter_overrides=_overrides(self.params, specs), **kw)
        except (InvalidParameterValueException, InvalidParameterTypeException, ValueError) as exc:
            raise MegalocError(f"bad parameter: {exc}") from None
        if node._values["autostart"] and not node._configured:
            err, name = node.last_error or "see the log", node.get_name()  # no handle after destroy
            node.destroy_node()
            raise MegalocError(f"{name} could not start: {err}")
        return node

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self._executor.spin()
        except ExternalShutdownException:
            pass

    @property
    def image_topic(self) -> str:
        """The fully resolved camera topic loop_closure_node listens on (once active)."""
        subs = self.loop_closure._own_subs if self.loop_closure is not None else []
        return subs[0].topic_name if subs else ""

    def nodes(self) -> list:
        return [n for n in (self.loop_closure, self.verifier) if n is not None]

    def wait_idle(self, timeout: float = 120.0, settle: float = 0.2) -> bool:
        """Until every received frame is processed and every published keyframe and candidate
        array has reached and been handled by the verifier (DDS delivery included)."""
        deadline = time.monotonic() + timeout
        lc, vn = self.loop_closure, self.verifier
        if vn is not None and not vn._own_subs:
            vn = None  # not active (autostart false, never activated): nothing will reach it
        while time.monotonic() < deadline:
            if not lc.wait_idle(timeout=max(0.0, deadline - time.monotonic())):
                return False
            done = True
            if vn is not None:
                kf_sent = lc.stats.count("keyframes")
                c_sent = lc.stats.count("retrieved")
                c_got = vn.stats.count("candidates_received")
                # verified + expired catches up with received only after the last verdict is out
                c_done = vn.stats.count("candidates_verified") + vn.stats.count("candidates_expired")
                done = (vn.stats.count("keyframes_received") >= kf_sent and c_got >= c_sent
                        and c_done >= c_got and vn.pending_count() == 0)
            if done:
                time.sleep(settle)  # a callback that is counting may still be publishing
                if lc.wait_idle(0) and (vn is None or vn.pending_count() == 0):
                    return True
            time.sleep(0.02)
        return False

    def save_map(self, path: str = "") -> list[str]:
        """Save the map (and ``<path>.verifier``); returns the files written."""
        out = [self.loop_closure.save_map(path)]
        if self.verifier is not None:
            out.append(self.verifier.save_map(path))
        return out

    def load_map(self, path: str = "") -> None:
        self.loop_closure.load_map(path)
        if self.verifier is not None:
            self.verifier.load_map(path)

    def stop(self) -> None:
        """Stop taking frames, let the queued ones reach the verifier, stop spinning, save, shut down."""
        import rclpy
        lc = self.loop_closure
        if lc is not None and self._executor is not None:
            try:
                lc.stop_input()
                if self.verifier is not None:
                    self.wait_idle(timeout=30.0, settle=0.0)
            except Exception as exc:
                print(f"megaloc-ros: draining {lc.get_name()}: {exc}")
        if self._executor is not None:
            self._executor.shutdown(timeout_sec=5.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for n in self.nodes():
            try:
                n.close()
            except Exception as exc:  # keep stopping the others
                print(f"megaloc-ros: stopping {n.get_name()}: {exc}")
        for n in self.nodes() + ([self.helper_node] if self.helper_node else []):
            try:
                n.destroy_node()
            except Exception:
                pass
        if self.context is not None:
            rclpy.try_shutdown(context=self.context)
        self.loop_closure = self.verifier = self.helper_node = None
        self._executor = self._thread = None

    def __enter__(self) -> "NodeSet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the `megaloc-ros run` command ------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="ROS 2 parameters YAML (e.g. config/loop_closure.yaml)")
    parser.add_argument("--image-topic", help="camera topic (sets image_topic)")
    parser.add_argument("--compressed", action="store_true", help="subscribe <topic>/compressed (CompressedImage)")
    parser.add_argument("--model-path", help="exported encoder ONNX (sets encoder.model_path)")
    parser.add_argument("--map-path", help="map file: loaded when it exists, saved on exit (sets map_path)")
    parser.add_argument("--namespace", default="", help="ROS namespace of both nodes")
    parser.add_argument("--no-verifier", action="store_true",
                        help="only loop_closure_node: the back end consumes ~/candidates")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="set one parameter (YAML value), e.g. -p detector.similarity_threshold:=0.7")


def _cli_params(args) -> dict[str, Any]:
    """The parameters file, then the flags, then ``-p`` (parsed by ``settings.parse_set``);
    names and types are checked against the nodes' specs."""
    from megaloc_ros.settings import parse_set
    params = load_params(args.params, args.namespace)
    if args.image_topic:
        params["image_topic"] = args.image_topic
    if args.compressed:
        params["image_transport"] = "compressed"
    if args.model_path:
        params["encoder.model_path"] = args.model_path
    if args.map_path:
        params["map_path"] = args.map_path
    try:
        params.update(parse_set(args.param, sep=":="))
    except MegalocError as exc:
        raise MegalocError(f"-p: {exc}") from None
    _check_types(params)
    return params


def _check_types(params: dict[str, Any]) -> None:
    """Each value against the settings dataclass field it sets (MegalocError naming it), so that
    a typo'd or mistyped value fails here with the field's type, not inside rclpy."""
    from megaloc_ros.settings import from_flat
    for node in (P.LOOP_CLOSURE_NODE, P.VERIFIER_NODE):
        for prefix, cls in P.node_sections(node).items():
            from_flat(cls, prefix, params)


def main(args) -> int:
    import signal
    nodes = NodeSet(_cli_params(args), namespace=args.namespace, use_verifier=not args.no_verifier)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with nodes:
        names = ", ".join(n.get_fully_qualified_name() for n in nodes.nodes())
        print(f"megaloc-ros run: {names} running; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        # further Ctrl-C change nothing (the handler above only sets ``stop``), and must not
        # kill the process once Python finalises: it puts its own handlers back to the
        # default, which dies of SIGINT, but leaves ignored signals ignored
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        print("megaloc-ros run: stopping (finishing queued frames, saving maps)", flush=True)
    return 0
