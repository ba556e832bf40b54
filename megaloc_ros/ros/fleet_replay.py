"""Fleet replay: the rtabmap sequence split between two robots, each in its own process, over DDS.

    python -m megaloc_ros.ros.fleet_replay [--mode concurrent|late|owner-gone] [--split 40] [--json out.json]

Robot A (``/robot_a``) plays frames 1..split, robot B (``/robot_b``) frames split+1..84, each
through its own loop_closure_node + verifier_node (``NodeSet``) with ``fleet_topic`` set to one
shared topic. Modes:

``concurrent``  both start together and play their frames at the pace their nodes take them;
``late``        B starts only after A has played all its frames (A stays up, serving its
                keyframes' verification data): B must get A's keyframes from the topic's backlog;
``owner-gone``  as ``late``, but A's process is killed before B plays: B's requests for A's
                keyframe data time out (counted) and B still finishes.

``--stall S`` (concurrent): B's process is frozen (SIGSTOP) for S seconds once it has played
``stall_at`` frames, while A goes on: a peer that is slow for a while, as on a loaded machine.
A must not take B for stopped and verify its queries against the end of B's map (near misses).

At the end each robot settles (its queries deferred for the other asked again and verified),
then keeps serving its keyframes' data until every robot has settled: a robot that left at once
made the other's late requests time out (30 s each).

The inter-robot loops both robots publish are scored against the sequence's ground truth
(pairs closer than the evaluation's exclusion window, 20 s, are not in the ground truth: they are
listed apart, not scored), and compared with the loops one robot verifies on the whole sequence
(the same pipeline in-process): the share of its inter-robot revisit frames (B's frames with a
true verified loop into A's) the fleet also finds. Bytes: the fleet messages per shared keyframe
(serialised) and the verification data fetched per verified inter-robot loop.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SECOND_NS = 1_000_000_000
ROBOTS = ("robot_a", "robot_b")


# ----------------------------------------------------------------------------- one robot (child)

def _robot_main(a) -> int:
    from megaloc_ros.msg import LoopClosureArray
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from megaloc_ros.io.datasets import rtabmap
    from megaloc_ros.ros import conversions as conv
    from megaloc_ros.ros.runner import NodeSet

    out = Path(a.dir)
    seq = rtabmap()
    lo, hi = (int(v) for v in a.frames.split(":"))
    params = {"image_topic": "image_raw", "image_qos": "reliable", "image_qos_depth": 1000, "queue_size": 1000,
              "map_path": a.map_path, "fleet_topic": a.fleet_topic, "fleet_robot": a.robot,
              "fleet_request_timeout": a.request_timeout, "fleet_peer_timeout": a.request_timeout,
              "candidate_wait": 60.0}  # a replay loses nothing to a busy machine (2 shared cores)
    reliable = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
    loops: list = []
    rejected: list = []  # the verdicts of loops not published, with their reasons (why a frame was missed)
    with NodeSet(params, namespace="/" + a.robot) as nodes:
        lc, vn, h = nodes.loop_closure, nodes.verifier, nodes.helper_node
        pub = h.create_publisher(Image, nodes.image_topic, reliable)
        sub = h.create_subscription(LoopClosureArray, "verifier_node/loop_closures",
                                    lambda m: loops.extend(m.loops), reliable)
        sub_rejected = h.create_subscription(LoopClosureArray, "verifier_node/rejected",
                                             lambda m: rejected.extend(m.loops), reliable)
        deadline = time.monotonic() + 30
        while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        t_wait = time.monotonic()
        if a.wait_peers:  # a late robot: the backlog first
            deadline = time.monotonic() + 60
            while lc.stats.count("fleet_keyframes_inserted") < a.wait_peers and time.monotonic() < deadline:
                time.sleep(0.05)
            _write(out / f"{a.robot}.backlog", {"inserted": lc.stats.count("fleet_keyframes_inserted"),
                                                "seconds": time.monotonic() - t_wait})
            while a.hold and not (out / a.hold).exists():  # e.g. until the owner is gone
                time.sleep(0.05)
        t0 = time.monotonic()
        for k, i in enumerate(range(lo, hi)):
            pub.publish(conv.rgb_to_image_msg(seq.load_rgb(i), int(seq.stamps_ns[i]), "camera"))
            deadline = time.monotonic() + 120
            while lc.stats.count("frames_processed") < k + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            (out / f"{a.robot}.played").write_text(str(k + 1))  # for the parent's --stall
        deadline = time.monotonic() + 120
        while lc.fleet_pending() and time.monotonic() < deadline:  # queries waiting for the peer's map
            time.sleep(0.1)
        idle = nodes.wait_idle(timeout=120)
        played_s = time.monotonic() - t0
        _write(out / f"{a.robot}.done", {"keyframes": lc.stats.count("keyframes"), "idle": idle})
        while not (out / "stop").exists():   # keep serving our keyframes to the other robot
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        while lc.fleet_pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        nodes.wait_idle(timeout=60)
        deadline = time.monotonic() + 10
        while len(loops) < vn.stats.count("loops_accepted") and time.monotonic() < deadline:
            time.sleep(0.05)
        # settled; keep serving until every robot is: a peer may still ask again of our map
        _write(out / f"{a.robot}.settled", {})
        while not (out / "exit").exists():
            time.sleep(0.1)
        result = {
            "robot": a.robot, "session": lc.session, "frames": [lo, hi], "played_s": played_s,
            "map_size": len(lc.mapping), "peer_keyframes": len(lc.peers),
            "verifier_keyframes": len(vn.verifier),
            "loops": [_loop(m) for m in loops],
            "rejected": [dict(_loop(m), reason=m.reason) for m in rejected],
            "loop_closure_stats": lc.stats.snapshot(), "verifier_stats": vn.stats.snapshot(),
        }
        h.destroy_subscription(sub)
        h.destroy_subscription(sub_rejected)
    _write(out / f"{a.robot}.json", result)
    return 0


def _loop(m) -> dict:
    from megaloc_ros.ros import conversions as conv
    return {"query_id": int(m.query_id), "match_id": int(m.match_id),
            "query_stamp": conv.stamp_to_ns(m.query_stamp), "match_stamp": conv.stamp_to_ns(m.match_stamp),
            "query_session": int(m.query_session), "match_session": int(m.match_session),
            "inliers": int(m.inliers)}


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.rename(path)


# ----------------------------------------------------------------------------- the fleet (parent)

def _wait(done, what: str, procs, timeout: float, period: float = 0.1) -> None:
    """Until ``done()``; an error when a robot process failed first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"{p.args[-1]} exited with {p.returncode} before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout:g} s")
        time.sleep(period)


def _wait_file(path: Path, procs, timeout: float) -> dict:
    _wait(path.exists, f"{path.name} was written", procs, timeout)
    return json.loads(path.read_text())


def _played(path: Path) -> int:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else 0


def _stall(proc, played: Path, at: int, seconds: float, procs, timeout: float) -> None:
    """Freeze ``proc``'s process group for ``seconds`` once it has played ``at`` frames."""
    _wait(lambda: _played(played) >= at, f"{played.stem} played {at} frames", procs, timeout, 0.02)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def baseline_loops(split: int) -> dict:
    """One robot, whole sequence, the same pipeline in-process: its verified loops."""
    from megaloc_ros.io.datasets import rtabmap
    from megaloc_ros.pipeline import build
    seq = rtabmap()
    pipe = build()
    loops = []
    for i in range(len(seq)):
        r = pipe.process(seq.load_rgb(i), int(seq.stamps_ns[i]))
        loops += [(int(l.candidate.query.stamp_ns // SECOND_NS), int(l.candidate.match.stamp_ns // SECOND_NS))
                  for l in r.loops if l.accepted]
    return {"loops": loops}


def score(results: list[dict], baseline: dict, split: int, exclude_s: float = 20.0) -> dict:
    """Inter-robot loops against the ground truth, and against the one-robot baseline."""
    from megaloc_ros.io.datasets import rtabmap
    gt = rtabmap().gt
    inter, near = [], []
    for r in results:
        for lp in r["loops"]:
            if lp["query_session"] == lp["match_session"]:
                continue
            i, j = lp["query_stamp"] // SECOND_NS, lp["match_stamp"] // SECOND_NS
            (near if abs(i - j) < exclude_s else inter).append((r["robot"], int(i), int(j), bool(gt[i, j])))
    true = [x for x in inter if x[3]]
    false = [x for x in inter if not x[3]]
    fleet_frames = {max(i, j) for _, i, j, ok in true}   # robot B's frame of each true pair
    base = [(i, j) for i, j in baseline["loops"] if (i >= split) != (j >= split) and abs(i - j) >= exclude_s]
    base_true = [(i, j) for i, j in base if gt[i, j]]
    base_frames = {max(i, j) for i, j in base_true}
    covered = base_frames & fleet_frames
    sent = sum(r["loop_closure_stats"].get("fleet_bytes_sent", 0) for r in results)
    n_sent = sum(r["loop_closure_stats"].get("fleet_keyframes_sent", 0) for r in results)
    fetched = sum(r["verifier_stats"].get("fleet_bytes_fetched", 0) for r in results)
    n_fetched = sum(r["verifier_stats"].get("fleet_keyframes_fetched", 0) for r in results)
    n_loops = sum(r["verifier_stats"].get("fleet_loops_accepted", 0) for r in results)
    return {
        "inter_robot_loops": len(inter), "true": len(true), "false": len(false),
        "false_loops": false, "unscored_within_exclusion": near,
        "fleet_frames": sorted(fleet_frames), "baseline_inter_robot_loops": len(base),
        "baseline_true": len(base_true), "baseline_false": len(base) - len(base_true),
        "baseline_frames": sorted(base_frames), "covered_frames": sorted(covered),
        "ratio": len(covered) / len(base_frames) if base_frames else None,
        "bytes_per_shared_keyframe": sent / n_sent if n_sent else None, "keyframes_shared": n_sent,
        "descriptor_bytes": results[0]["loop_closure_stats"].get("fleet_descriptor_bytes"),
        "keyframes_fetched": n_fetched, "bytes_fetched": fetched,
        "bytes_per_fetched_keyframe": fetched / n_fetched if n_fetched else None,
        "verified_inter_robot_loops_published": n_loops,
        "bytes_per_verified_loop": (fetched + sent) / n_loops if n_loops else None,
        "fetch_bytes_per_verified_loop": fetched / n_loops if n_loops else None,
        "requests": sum(r["verifier_stats"].get("fleet_requests", 0) for r in results),
        "requests_timed_out": sum(r["verifier_stats"].get("fleet_requests_timed_out", 0) for r in results),
        "requests_failed": sum(r["verifier_stats"].get("fleet_requests_failed", 0) for r in results),
    }


def run_fleet(mode: str = "concurrent", split: int = 40, work_dir: str = "", baseline: bool = True,
              timeout: float = 900.0, request_timeout: float = 0.0, quiet: bool = False,
              stall: float = 0.0, stall_at: int = 28) -> dict:
    """Run the two robots as two processes; returns the per-robot results and the scores.
    ``request_timeout`` (both robots' ``fleet_request_timeout`` and ``fleet_peer_timeout``) 0:
    30 s (an owner alive but slow on a busy machine still answers), 3 s in ``owner-gone`` mode.
    ``stall`` > 0 (concurrent): freeze robot_b for that many seconds after it played ``stall_at``
    frames (by default frame 67: robot_a is then at about its frame 28, and its next frames revisit
    the places robot_b is about to map)."""
    request_timeout = request_timeout or (3.0 if mode == "owner-gone" else 30.0)
    d = Path(work_dir or tempfile.mkdtemp(prefix="megaloc_fleet_"))
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("*"):
        if f.is_file():
            f.unlink()
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(random.Random().randrange(201, 231)))  # away from the tests' 120-139
    topic = f"/megaloc_fleet_{os.getpid()}/keyframes"
    t_start = time.monotonic()

    def start(robot, frames, extra=()):
        log = open(d / f"{robot}.log", "w")
        cmd = [sys.executable, "-m", "megaloc_ros.ros.fleet_replay", "--child", "--dir", str(d),
               "--fleet-topic", topic, "--frames", frames, "--request-timeout", str(request_timeout),
               "--map-path", str(d / f"{robot}.map"), *extra, "--robot", robot]
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    procs = []
    try:
        a = start(ROBOTS[0], f"0:{split}")
        procs.append(a)
        late = mode in ("late", "owner-gone")
        if late:
            done_a = _wait_file(d / f"{ROBOTS[0]}.done", procs, timeout)
            extra = ["--wait-peers", str(done_a["keyframes"])]
            if mode == "owner-gone":
                extra += ["--hold", "owner_gone"]
            b = start(ROBOTS[1], f"{split}:84", extra)
            procs.append(b)
            if mode == "owner-gone":
                _wait_file(d / f"{ROBOTS[1]}.backlog", procs, timeout)
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
                (d / "owner_gone").write_text("")
        else:
            procs.append(start(ROBOTS[1], f"{split}:84"))
            if stall > 0:
                _stall(procs[1], d / f"{ROBOTS[1]}.played", stall_at, stall, procs, timeout)
        live, live_robots = (procs[1:], ROBOTS[1:]) if mode == "owner-gone" else (procs, ROBOTS)
        for step, then in (("done", "stop"), ("settled", "exit")):
            for r in live_robots:
                _wait_file(d / f"{r}.{step}", live, timeout)
            (d / then).write_text("")
        for p in live:
            p.wait(timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"{p.args[-1]} exited with {p.returncode}; see {d}/{p.args[-1]}.log")
        results = [json.loads((d / f"{r}.json").read_text()) for r in ROBOTS if (d / f"{r}.json").exists()]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for r in ROBOTS:
            log = d / f"{r}.log"
            if log.exists():
                print(f"--- {log} (tail)\n" + "\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
        raise
    fleet_s = time.monotonic() - t_start
    backlog = d / f"{ROBOTS[1]}.backlog"
    out = {"mode": mode, "split": split, "stall": stall, "work_dir": str(d), "fleet_seconds": fleet_s,
           "robots": results,
           "backlog": json.loads(backlog.read_text()) if backlog.exists() else None}
    base = baseline_loops(split) if baseline else {"loops": []}
    out["baseline"] = base
    out["score"] = score(results, base, split)
    if not quiet:
        print(summary(out))
    return out


def summary(out: dict) -> str:
    s = out["score"]
    lines = [f"fleet replay ({out['mode']}): rtabmap frames 1-{out['split']} robot_a, "
             f"{out['split'] + 1}-84 robot_b, two processes over DDS, {out['fleet_seconds']:.0f} s"
             + (f", robot_b frozen {out['stall']:g} s on the way" if out.get("stall") else "")]
    for r in out["robots"]:
        ls, vs = r["loop_closure_stats"], r["verifier_stats"]
        inter = sum(1 for lp in r["loops"] if lp["query_session"] != lp["match_session"])
        lines.append(f"  {r['robot']} (session {r['session']}): map {r['map_size']} keyframes "
                     f"({r['peer_keyframes']} from its peer), verifier {r['verifier_keyframes']}, "
                     f"{len(r['loops'])} loops published ({inter} inter-robot), shared "
                     f"{ls.get('fleet_keyframes_sent', 0):.0f} keyframes, fetched "
                     f"{vs.get('fleet_keyframes_fetched', 0):.0f}"
                     f" peer keyframes ({vs.get('fleet_requests_timed_out', 0):.0f} requests timed out)")
    if out.get("backlog"):
        b = out["backlog"]
        lines.append(f"  robot_b got {b['inserted']} backlog keyframes in {b['seconds']:.1f} s")
    lines.append(f"  inter-robot loops scored: {s['inter_robot_loops']} ({s['true']} true / {s['false']} false); "
                 f"{len(s['unscored_within_exclusion'])} more within 20 s of each other (not in the ground truth)")
    if s["ratio"] is not None:
        lines.append(f"  one robot on the whole sequence verifies {s['baseline_true']} true / {s['baseline_false']} "
                     f"false inter-half loops on {len(s['baseline_frames'])} frames of robot_b; the fleet finds "
                     f"{len(s['covered_frames'])} of those frames: {100 * s['ratio']:.1f}% "
                     f"(and {len(set(s['fleet_frames']) - set(s['baseline_frames']))} frames more)")
    f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    lines.append(f"  bytes: {f(s['bytes_per_shared_keyframe'])} per shared keyframe (serialised message), "
                 f"{f(s['bytes_per_fetched_keyframe'])} per fetched keyframe's verification data, "
                 f"{f(s['fetch_bytes_per_verified_loop'])} fetched per verified inter-robot loop "
                 f"({f(s['bytes_per_verified_loop'])} with all shared descriptors), "
                 f"{s['requests']} requests, {s['requests_timed_out']} timed out")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megaloc_ros.ros.fleet_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("concurrent", "late", "owner-gone"), default="concurrent")
    p.add_argument("--split", type=int, default=40, help="robot_a plays frames 1..split (default 40)")
    p.add_argument("--dir", default="", help="work folder (logs, maps, results); default a new temporary one")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-robot run on the whole sequence")
    p.add_argument("--request-timeout", type=float, default=0.0,
                   help="fleet_request_timeout and fleet_peer_timeout of both robots (default 30 s; owner-gone 3 s)")
    p.add_argument("--stall", type=float, default=0.0,
                   help="concurrent: freeze robot_b for this many seconds after --stall-at frames (SIGSTOP)")
    p.add_argument("--stall-at", type=int, default=28)
    # one robot (the child processes)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--robot", default="")
    p.add_argument("--frames", default="")
    p.add_argument("--fleet-topic", default="")
    p.add_argument("--map-path", default="")
    p.add_argument("--wait-peers", type=int, default=0)
    p.add_argument("--hold", default="")
    a = p.parse_args(argv)
    if a.child:
        return _robot_main(a)
    out = run_fleet(a.mode, a.split, a.dir, baseline=not a.no_baseline, request_timeout=a.request_timeout,
                    stall=a.stall, stall_at=a.stall_at)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
