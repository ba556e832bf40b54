"""The fleet pose graph (megaloc_ros.backend.fleet_graph): two robots' graphs, each in its own
odometry frame, merged into one map frame by an inter-robot loop; and the two-robot TUM
fr3/cabinet evaluation (`megaloc-ros eval --pose-graph tum_fr3_cabinet --robots 2`)."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.backend.fleet_graph import FleetPoseGraph
from megaloc_ros.backend.pose_graph import PoseGraphParams
from megaloc_ros.errors import MegalocError
from megaloc_ros.verification.metric_pose import pose_error
from megaloc_ros.types import SECOND_NS as NS
from test_pose_graph import BASE_T_CAM, cam_loop, drifted, truth_at


def _params(**kw) -> PoseGraphParams:
    return PoseGraphParams(base_T_camera=tuple(BASE_T_CAM.reshape(-1)), **kw)


def _two_robots(b_odometry):
    """A drives the first half lap (odometry = the world frame), B the second half from its own
    origin (B's odometry frame starts at the identity where B starts, 20 s in)."""
    ta, tb = np.arange(0.0, 20.0, 0.5), np.arange(20.0, 40.0, 0.5)
    g = FleetPoseGraph(_params())
    for t in ta:
        g.add_keyframe("a", int(t * NS), truth_at(t))
    origin = truth_at(20.0)
    odom_b = b_odometry(tb, origin)
    return g, ta, tb, odom_b, origin


def test_a_robot_joins_the_map_at_its_first_inter_robot_loop():
    g, ta, tb, odom_b, origin = _two_robots(
        lambda tb, origin: [np.linalg.inv(origin) @ truth_at(t) for t in tb])
    for t, T in zip(tb[:-2], odom_b[:-2]):
        g.add_keyframe("b", int(t * NS), T)
    # a loop inside B first: B has no place in the map yet, the loop waits for it
    assert g.add_loop("b", int(tb[-3] * NS), "b", int(tb[0] * NS), cam_loop(tb[-3], tb[0])).status == "added"
    g.update()
    assert not g.merged("b") and g.poses("b") is None and g.origin("b") is None
    assert g.merged("a") and np.allclose(g.origin("a"), np.eye(4), atol=1e-6)
    for t, T in zip(tb[-2:], odom_b[-2:]):
        g.add_keyframe("b", int(t * NS), T)
    # B, near the end of the lap, sees where A started
    g.add_loop("b", int(tb[-1] * NS), "a", int(ta[1] * NS), cam_loop(tb[-1], ta[1]))
    g.update()
    assert g.merged("b") and g.stats["inter_robot_loops"] == 1
    te, re = pose_error(g.origin("b"), origin)
    assert te < 1e-3 and re < 0.05, (te, re)       # exact odometry and loop: B's origin exactly
    P = g.poses("b")
    assert max(pose_error(P[k], truth_at(t))[0] for k, t in enumerate(tb)) < 1e-3


def test_drifted_robots_end_up_in_one_frame():
    """B's odometry drifts (yaw-rate bias, 3% scale); two inter-robot loops (where B starts, A's
    end; where B ends, A's start) place it in A's map far better than its odometry alone could."""
    g, ta, tb, odom_b, origin = _two_robots(
        lambda tb, origin: [np.linalg.inv(origin) @ T for T in drifted(tb, 0.01, 1.03)])
    for t, T in zip(tb, odom_b):
        g.add_keyframe("b", int(t * NS), T)
    g.add_loop("b", int(tb[0] * NS), "a", int(ta[-1] * NS), cam_loop(tb[0], ta[-1]))
    g.add_loop("b", int(tb[-1] * NS), "a", int(ta[1] * NS), cam_loop(tb[-1], ta[1]))
    g.update()
    P = g.poses("b")
    merged = max(pose_error(P[k], truth_at(t))[0] for k, t in enumerate(tb))
    # B's odometry put in the map at its true origin (the best it could do without the loops)
    alone = max(pose_error(origin @ T, truth_at(t))[0] for T, t in zip(odom_b, tb))
    assert merged < 0.25 * alone, (merged, alone)


def test_gnc_is_refused():
    with pytest.raises(MegalocError, match="gnc"):
        FleetPoseGraph(PoseGraphParams(robust="gnc"))


def test_tum_cabinet_split_between_two_robots(real_encoder):
    """TUM fr3/cabinet: A the first half, B the second, each from its own odometry origin: B joins
    A's map at the first inter-robot loop, and the merged trajectory (one SE(3) alignment for both)
    is as good as one robot's over the whole sequence with the same loops. B's first keyframe sees
    A's last (one walk cut in two); without that hand-over loop B joins at the revisit instead."""
    from megaloc_ros.evaluation import fleet_trajectory as FT
    from megaloc_ros.evaluation import trajectory_eval as TE
    seq = TE.load_rgbd_sequence("tum_fr3_cabinet")
    split = len(seq) // 2
    loops, _ = TE.pipeline_loops(seq, encoder=real_encoder, log=lambda *a: None,
                                 sessions=[0 if i < split else 1 for i in range(len(seq))])
    r = FT.run(seeds=3, loops=loops)
    print(FT.report(r))
    assert r.inter_robot_loops >= 1
    assert all(s.merged_at_frame >= r.split for s in r.seeds)
    assert r.median("ate_merged") <= 0.05                                   # measured 1.9 cm
    assert r.median("ate_merged") <= 2.0 * r.median("ate_single_robot")    # measured 1.9 vs 1.6 cm
    revisits = [lp for lp in loops if abs(lp.query - lp.match) > 5]
    assert revisits and len(revisits) < len(loops)
    later = FT.run(seeds=3, loops=revisits)
    first = min(max(lp.query, lp.match) for lp in revisits)
    assert all(s.merged_at_frame == first for s in later.seeds)
    assert later.median("ate_merged") <= 0.05
