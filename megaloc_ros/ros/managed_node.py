"""``ManagedNode``: the lifecycle skeleton shared by loop_closure_node and verifier_node.

Parameters from ``params`` specs (validated, int->float coerced, the node's dataclass checked
before anything starts, live updates of its fields), autostart, the lifecycle transitions
(a failing configure is logged and sets ``last_error``), the ownership and release of
subscriptions, publishers, services and timers, ``~/save_map`` / ``~/load_map`` with saving on
shutdown, and /diagnostics with per-report deltas. A node fills in the hooks below.
``spin_single`` runs one node alone (the nodes' ``main``, the installed executables).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from megaloc_ros.srv import LoadMap, SaveMap

from megaloc_ros.errors import MegalocError
from megaloc_ros.settings import from_flat
from megaloc_ros.ros import params as P
from megaloc_ros.ros.diagnostics import Stats, level_of, status_array

RELIABLE_KEEP_ALL = QoSProfile(depth=1, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


@contextlib.contextmanager
def destroyed_on_error(node):
    """Destroy ``node`` if the block raises (a constructor refusing its parameters): the caller
    never gets the object, and an undestroyed node stays in the ROS graph until garbage
    collection with its services answering nothing (a second ``loop_closure_node`` that made
    clients of the real one wait for it)."""
    try:
        yield
    except BaseException:
        try:
            node.destroy_node()
        except Exception:  # the original error is the one to report
            pass
        raise


class ManagedNode(LifecycleNode):
    """Base of the megaloc_ros nodes. ``specs``: the node's parameters; ``prefix`` and
    ``params_cls``: the dataclass its live ``<prefix>.*`` parameters build; ``sections``: every
    ``{prefix: settings class}`` a parameter change is checked against (default: that one).
    A subclass sets up its own state after ``super().__init__`` and then calls ``_autostart()``."""

    STATE_NAME = "map"   # in log messages: what save_map writes
    DIAG_ERRORS: tuple[str, ...] = ()   # counters whose increase makes the report WARN ...
    DIAG_ERROR_TEXT = "errors"
    DIAG_WARNING = ("", "")   # ... and one lost-input counter, with its words in the message

    def __init__(self, node_name: str, specs, prefix: str, params_cls: type,
                 sections: Optional[dict[str, type]] = None, **kwargs):
        super().__init__(node_name, **kwargs)
        self._specs, self._prefix, self._params_cls = specs, prefix, params_cls
        with self.destroyed_on_error():
            self._values = P.declare(self, specs)
            self.add_on_set_parameters_callback(P.validator(specs, sections or {prefix: params_cls},
                                                            lambda: self._values))
            self.add_post_set_parameters_callback(self._after_set_parameters)
            self._build_params()  # its own checks, before anything starts
        self.stats = Stats()
        self.last_error = ""
        self._dirty = False  # state changed since the last save
        self._own_subs: list = []
        self._own_pubs: list = []
        self._own_services: list = []
        self._own_timers: list = []
        self._prev_snapshot: dict[str, float] = {}
        self._configured = False

    def destroyed_on_error(self):
        return destroyed_on_error(self)

    def _autostart(self) -> None:
        if self._values["autostart"]:
            self.start()

    # ----------------------------------------------------------------- hooks
    def _configure(self) -> None:
        """Build the node's state and publishers (appended to ``_own_pubs``)."""
        raise NotImplementedError

    def _activate(self) -> None:
        """Create the input subscriptions (``_own_subs``)."""
        raise NotImplementedError

    def _extra_services(self) -> list:
        """(type, name, callback) of more services, in the same group as save/load."""
        return []

    def _apply_params(self) -> None:
        """``<prefix>.*`` parameters changed (``_values`` holds the new ones)."""

    def _drain(self) -> None:
        """Finish the input already received (input subscriptions are gone)."""

    def _stop_work(self) -> None:
        """Stop the node's own threads and drop queued input."""

    def _keyframe_count(self) -> Optional[int]:
        """Keyframes in the saved state; None while there is no state."""
        raise NotImplementedError

    def _tick(self) -> None:
        """Timer, every ``diagnostics_period``: update gauges, then ``_publish_diagnostics``."""
        raise NotImplementedError

    def save_map(self, path: str = "") -> str:
        raise NotImplementedError

    def load_map(self, path: str = "") -> str:
        raise NotImplementedError

    # ----------------------------------------------------------------- parameters
    def _param(self, name: str):
        return self._values[name]

    def _build_params(self):
        return from_flat(self._params_cls, self._prefix, self._values)

    def _after_set_parameters(self, params) -> None:
        for p in params:
            v = p.value
            if isinstance(self._values.get(p.name), float) and isinstance(v, int):
                v = float(v)
            self._values[p.name] = v
        if any(p.name.startswith(self._prefix + ".") for p in params):
            self._apply_params()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> bool:
        """Configure and activate (what ``autostart`` does); False with ``last_error`` set on failure."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
            self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            self._own_pubs.append(self._pub_diag)
            group = MutuallyExclusiveCallbackGroup()  # map files and queries never overlap
            services = [(SaveMap, "~/save_map", self._srv_save_map), (LoadMap, "~/load_map", self._srv_load_map)]
            self._own_services = [self.create_service(t, name, cb, callback_group=group)
                                  for t, name, cb in services + self._extra_services()]
            self._own_timers.append(self.create_timer(self._param("diagnostics_period"), self._tick,
                                                      callback_group=MutuallyExclusiveCallbackGroup()))
            if self._param("autosave_period") > 0 and self._param("map_path"):
                self._own_timers.append(self.create_timer(self._param("autosave_period"), self._autosave,
                                                          callback_group=MutuallyExclusiveCallbackGroup()))
            self._configured = True
        except Exception as exc:  # rclpy swallows exceptions of transition callbacks: say it here
            self.last_error = str(exc)
            self.get_logger().error(f"configure failed: {exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._activate()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_input()
        self._save_if_dirty()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._save_if_dirty()
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
        return super().on_shutdown(state)

    def stop_input(self) -> None:
        """Stop taking input and finish what was received (its results are published)."""
        self._drop_subscriptions()
        if self._configured:
            self._drain()

    def destroy_node(self) -> None:
        super().destroy_node()
        # rclpy's LifecycleNode never destroys its state machine, and the state machine holds the
        # node: without this the node and its lifecycle services stay in the ROS graph until
        # garbage collection, and a client of a later node of the same name waits on them
        machine = getattr(self, "_state_machine", None)
        if machine is not None:
            machine.destroy_when_not_in_use()

    def close(self) -> None:
        """Stop taking input, finish it, save (``save_map_on_shutdown``) and release everything.
        Safe to call more than once and after rclpy shut down."""
        self.stop_input()
        if self._configured:
            self._save_if_dirty()
        self._release()

    def _drop_subscriptions(self) -> None:
        for s in self._own_subs:
            try:
                self.destroy_subscription(s)
            except Exception:
                pass
        self._own_subs = []

    def _release(self) -> None:
        self._stop_work()
        for t in self._own_timers:
            self.destroy_timer(t)
        for s in self._own_services:
            self.destroy_service(s)
        for p in self._own_pubs:
            try:
                if hasattr(p, "on_deactivate"):
                    self.destroy_lifecycle_publisher(p)
                else:
                    self.destroy_publisher(p)
            except Exception:
                pass
        self._own_timers, self._own_services, self._own_pubs = [], [], []
        self._configured = False

    # ----------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self, hardware_id: str, fatal: Optional[str] = None) -> None:
        """One status from the counters: WARN when ``DIAG_ERRORS`` or the ``DIAG_WARNING`` counter
        grew since the previous report, ERROR with ``fatal``."""
        snap = self.stats.snapshot()
        prev, self._prev_snapshot = self._prev_snapshot, snap
        delta = lambda k: int(snap.get(k, 0) - prev.get(k, 0))  # noqa: E731
        errors = sum(delta(k) for k in self.DIAG_ERRORS)
        warnings = delta(self.DIAG_WARNING[0]) if self.DIAG_WARNING[0] else 0
        msg = fatal or (f"{errors} {self.DIAG_ERROR_TEXT}" if errors else
                        f"{warnings} {self.DIAG_WARNING[1]}" if warnings else "ok")
        if errors and self.stats.last_error:
            msg += f"; last: {self.stats.last_error}"
        self._pub_diag.publish(status_array(self.get_clock().now().to_msg(), f"megaloc_ros: {self.get_name()}",
                                            hardware_id, snap, level_of(errors, warnings, fatal), msg))

    # ----------------------------------------------------------------- map files
    def _map_path(self, path: str) -> str:
        """``path`` or the map_path parameter, absolute: a relative one is resolved against the
        node's working directory (where it was started), and reported absolute."""
        path = path or self._param("map_path")
        if not path:
            raise MegalocError("no path given and the map_path parameter is empty")
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(path):
            raise MegalocError(f"map path {path} is a directory; give a file name, e.g. {path}/map.megaloc")
        return path

    def _write_state(self, out: str, lock, write) -> str:
        """``write(out)`` under ``lock`` (which guards the state it reads), creating the folder."""
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with lock:
            write(out)
            self._dirty = False
        self.get_logger().info(f"saved {self.STATE_NAME} with {self._keyframe_count()} keyframes to {out}")
        return out

    def _save_if_dirty(self) -> None:
        path = self._param("map_path")
        if not (path and self._param("save_map_on_shutdown") and self._dirty and self._keyframe_count() is not None):
            return
        try:
            self.save_map(path)
        except Exception as exc:
            self.get_logger().error(f"saving the {self.STATE_NAME} to {path} failed: {exc}")

    def _autosave(self) -> None:
        """Timer: save to map_path when the state changed (bounds what a crash can lose)."""
        if self._dirty:
            try:
                self.save_map(self._param("map_path"))
            except Exception as exc:
                self.stats.error("save_errors", str(exc))
                self.get_logger().error(f"autosave to {self._param('map_path')} failed: {exc}",
                                        throttle_duration_sec=60.0)

    def _srv_save_map(self, req, res):
        return self._answer_map_service(res, self.save_map, req.path, "saved {} keyframes to {}")

    def _srv_load_map(self, req, res):
        return self._answer_map_service(res, self.load_map, req.path, "loaded {} keyframes from {}",
                                        log_failure="load_map")

    def _answer_map_service(self, res, action, path, done: str, log_failure: str = ""):
        """Run a save/load service call; the reply says what happened, a failure never escapes."""
        try:
            out = action(path)
            res.success, res.message = True, done.format(self._keyframe_count(), out)
        except Exception as exc:
            res.success, res.message = False, str(exc)
            if log_failure:
                self.get_logger().error(f"{log_failure}: {exc}")
        return res


def spin_single(node_cls, args=None) -> None:
    """Run one node until Ctrl-C (the installed executables; a ManagedNode or a plain adapter
    node). A bad parameter, a missing dependency or a failed
    autostart is one line on stderr and exit status 2, not a traceback. Once stopping, further
    SIGINT/SIGTERM are ignored: `ros2 launch` and the terminal both send SIGINT, and the second
    must not interrupt the shutdown save."""
    import signal
    import sys

    import rclpy
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    rclpy.init(args=args)
    try:
        node = node_cls()
    except (InvalidParameterValueException, InvalidParameterTypeException, ValueError, MegalocError) as exc:
        print(f"{node_cls.__name__} cannot start: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    if getattr(node, "_values", {}).get("autostart") and not node._configured:
        print(f"{node.get_name()}: could not start: {node.last_error or 'see the log'}", file=sys.stderr)
        node.destroy_node()
        rclpy.try_shutdown()
        sys.exit(2)
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if hasattr(node, "close"):
            node.close()
        node.destroy_node()
        rclpy.try_shutdown()
