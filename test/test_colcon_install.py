"""Installed the ROS 2 way: the package built by colcon in a workspace of its own, its node
executables started from the install space with the installed config, the 84 real rtabmap frames
published over DDS from this process, verified loops received, Ctrl-C exits cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from megaloc_ros.msg import LoopClosureArray  # noqa: E402
from megaloc_ros.ros import conversions as conv  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ros]

ROOT = Path(__file__).resolve().parents[1]
DOMAIN_ID = 160 + os.getpid() % 40  # a domain of its own (test_ros_nodes uses 120-139)
BASE_NS = 1_700_000_000 * conv.NS
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
MIN_LOOPS = 5


def _without_project_paths(env: dict) -> dict:
    """This shell's environment minus the working tree and its interface build (.ros/), so that
    only the workspace's install space provides megaloc_ros."""
    out = {k: v for k, v in env.items() if not k.startswith(("MEGALOC_", "COLCON_"))}
    for var in ("PYTHONPATH", "LD_LIBRARY_PATH", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
        keep = [p for p in env.get(var, "").split(os.pathsep)
                if p and p != str(ROOT) and not p.startswith(str(ROOT / ".ros"))]
        if keep:
            out[var] = os.pathsep.join(keep)
        else:
            out.pop(var, None)
    return out


def colcon_build(ws: Path) -> Path:
    """`colcon build` of a copy of the package (what a clone has) in ``ws``; returns its prefix."""
    src = ws / "src" / "megaloc_ros"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    env = _without_project_paths(dict(os.environ))
    cmake_args = ["-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={sys.executable}"]
    if not env.get("ROS_DISTRO"):
        # ROS 2 from the PyPI wheels, as tools/setup_env.sh builds the interfaces: the venv is the
        # prefix, and numpy's headers go through the link that script made (CMake refuses exported
        # include paths inside the source tree, and the venv is inside it).
        env["CMAKE_PREFIX_PATH"] = env["AMENT_PREFIX_PATH"] = sys.prefix
        numpy_inc = Path("/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include")
        if numpy_inc.is_dir():
            cmake_args.append(f"-DPython3_NumPy_INCLUDE_DIR={numpy_inc}")
    r = subprocess.run(["colcon", "build", "--cmake-args", *cmake_args], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return ws / "install" / "megaloc_ros"


def installed_env(ws: Path, **extra) -> dict:
    """The environment after `. install/local_setup.sh`, as a user's shell has it."""
    base = _without_project_paths(dict(os.environ))
    r = subprocess.run(["bash", "-c", '. install/local_setup.sh && env -0'], cwd=ws, env=base,
                       capture_output=True, text=True, check=True)
    env = dict(item.split("=", 1) for item in r.stdout.split("\0") if "=" in item)
    env.update(extra)
    return env


def offline_model() -> Path:
    """The cached offline ONNX model (tools/setup_env.sh builds it), found by the model search."""
    from megaloc_ros.encoding.loader import offline_model_path
    return offline_model_path()


def overrides(config: Path, **values) -> list[str]:
    """``-p name:=value`` for each parameter, under the name the installed config gives it
    (``model_path`` or ``encoder.model_path``); names it does not have are left out."""
    names = yaml.safe_load(config.read_text())["/**"]["ros__parameters"]
    out = []
    for name, value in values.items():
        found = next((n for n in (name, f"encoder.{name}") if n in names), None)
        if found:
            out += ["-p", f"{found}:={value}"]
    return out


def test_colcon_installed_nodes_find_true_loops_and_exit_cleanly(tmp_path, rtabmap_seq):
    t0 = time.monotonic()
    ws = tmp_path / "ws"
    prefix = colcon_build(ws)
    t_build = time.monotonic() - t0
    exe = prefix / "lib" / "megaloc_ros"
    config = prefix / "share" / "megaloc_ros" / "config" / "loop_closure.yaml"
    for name in ("loop_closure_node", "verifier_node", "megaloc-ros"):
        assert os.access(exe / name, os.X_OK), f"{name} not installed"
    assert (prefix / "share" / "megaloc_ros" / "launch" / "loop_closure.launch.py").is_file()
    env = installed_env(ws, ROS_DOMAIN_ID=str(DOMAIN_ID), XDG_CACHE_HOME=str(tmp_path / "cache"),
                        PYTHONUNBUFFERED="1")

    r = subprocess.run([str(exe / "megaloc-ros"), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "export" in r.stdout, r.stderr[-2000:]
    # Every megaloc_ros module the nodes use comes from the install space. (This venv's editable
    # install also puts the working tree on sys.path, behind it.)
    site = next(prefix.glob("lib/python3*/site-packages"))
    check = ("import sys, megaloc_ros.msg, megaloc_ros.srv, megaloc_ros.ros.loop_closure_node, "
             "megaloc_ros.ros.verifier_node, megaloc_ros.encoding.encoder\n"
             "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
             "if n.startswith('megaloc_ros') and getattr(m, '__file__', None)))")
    r = subprocess.run([sys.executable, "-c", check], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    outside = [f for f in r.stdout.split() if not f.startswith(str(site))]
    assert not outside, f"modules not from the install space: {outside}"

    args = ["--ros-args", "--params-file", str(config),
            *overrides(config, model_path=offline_model(), image_qos="reliable", image_qos_depth=100,
                       queue_size=100, device="cpu")]
    assert any("model_path:=" in a for a in args), "no model_path parameter in the installed config"
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("loop_closure_node", "verifier_node")}
    procs = {n: subprocess.Popen([str(exe / n), *args], env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
             for n, f in logs.items()}

    def log_tail(n=3000):
        return "\n".join(f"--- {k}\n{(tmp_path / f'{k}.log').read_text()[-n:]}" for k in procs)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("install_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    loops, lock = [], threading.Lock()

    def on_loops(msg):
        with lock:
            loops.extend(msg.loops)

    try:
        node.create_subscription(LoopClosureArray, "verifier_node/loop_closures", on_loops, RELIABLE)
        pub = node.create_publisher(Image, "image_raw", RELIABLE)
        deadline = time.monotonic() + 60
        while pub.get_subscription_count() == 0 or node.count_publishers("verifier_node/loop_closures") == 0:
            assert all(p.poll() is None for p in procs.values()), "a node died\n" + log_tail()
            assert time.monotonic() < deadline, "nodes did not come up\n" + log_tail()
            time.sleep(0.1)
        t_up = time.monotonic() - t0 - t_build
        for i in range(len(rtabmap_seq)):
            pub.publish(conv.rgb_to_image_msg(rtabmap_seq.load_rgb(i), BASE_NS + i * conv.NS, "camera", "bgr8"))
            time.sleep(0.05)
        # until MIN_LOOPS have come and then the verifier has been quiet for a while (all frames
        # encoded, all candidates checked); on a loaded machine the first loop can take long
        deadline, last, seen = time.monotonic() + 240, time.monotonic(), 0
        while time.monotonic() < deadline and (seen < MIN_LOOPS or time.monotonic() - last < 10):
            assert all(p.poll() is None for p in procs.values()), "a node died\n" + log_tail()
            with lock:
                if len(loops) != seen:
                    seen, last = len(loops), time.monotonic()
            time.sleep(0.1)
        with lock:
            pairs = {(round((conv.stamp_to_ns(lc.query_stamp) - BASE_NS) / conv.NS),
                      round((conv.stamp_to_ns(lc.match_stamp) - BASE_NS) / conv.NS)) for lc in loops}
            assert all(lc.verified for lc in loops)
        wrong = sorted(p for p in pairs if not rtabmap_seq.gt[p])
        assert not wrong, f"verified loops not in the ground truth: {wrong}"
        assert len(pairs) >= MIN_LOOPS, f"only {len(pairs)} verified loops: {sorted(pairs)}\n" + log_tail()
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        t_stop = time.monotonic()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = {}
        for n, p in procs.items():
            try:
                codes[n] = p.wait(timeout=max(1.0, 10 - (time.monotonic() - t_stop)))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = "still running 10 s after SIGINT"
        for f in logs.values():
            f.close()
    assert codes == {"loop_closure_node": 0, "verifier_node": 0}, f"{codes}\n" + log_tail()
    print(f"\ncolcon build {t_build:.0f} s, nodes up {t_up:.0f} s, {len(pairs)} verified loops, "
          f"total {time.monotonic() - t0:.0f} s")
