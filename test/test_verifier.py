"""Verifier on real images and real backbone features: decisions, reasons, storage, files."""
from pathlib import Path
import numpy as np

import pytest

from megaloc_ros.errors import MapFileError
from megaloc_ros.types import Candidate, Keyframe
from megaloc_ros.verification.verifier import Verifier, VerifierParams
from megaloc_ros.verification.geometry import Camera

N_MAP = 40  # frames 0..39 are the first traversal; 40.. revisit them


@pytest.fixture(scope="module")
def feats(request, rtabmap_seq):
    try:
        return request.getfixturevalue("rtabmap_features")
    except pytest.FixtureLookupError:  # before the shared fixture exists
        from megaloc_ros.encoding.encoder import encode_files
        from megaloc_ros.encoding.loader import load_encoder
        return encode_files(load_encoder(), rtabmap_seq.image_paths)


def kf(i):
    return Keyframe(i, i * 1_000_000_000)


@pytest.fixture(scope="module")
def built(rtabmap_seq, feats):
    # these tests decide one query at a time: the pair decision, without sequence consistency
    v = Verifier(VerifierParams(vocab_keyframes=20, vocabulary="map", consistency_window=0))
    pending = []
    for i in range(N_MAP):
        v.add_keyframe(kf(i), rtabmap_seq.load_rgb(i), feats[i])
        pending.append(v.has_vocabulary)
    for q in (60, 62):
        v.add_keyframe(kf(q), rtabmap_seq.load_rgb(q), feats[q])
    return v, pending


def cands(q, matches, feats):
    return [Candidate(kf(q), kf(m), float(feats[q].descriptor @ feats[m].descriptor), r)
            for r, m in enumerate(matches)]


def test_vocabulary_is_fitted_once_enough_keyframes_exist(built):
    v, pending = built
    assert pending.index(True) == 19  # fitted when the 20th keyframe arrived
    assert v.centroids.shape == (32, 384) and v.pca.dim <= 256
    assert len(v) == N_MAP + 2


def test_true_loop_accepted_false_one_rejected_with_reasons(built, rtabmap_seq, feats):
    v, _ = built
    true_m = 20
    assert rtabmap_seq.gt[60, true_m] and not rtabmap_seq.gt[60, 35]
    res = v.verify(cands(60, [35, true_m], feats))
    assert [r.candidate.match.id for r in res] == [35, true_m]  # input order kept
    bad, good = res
    assert good.accepted and not bad.accepted
    # the reason names the statistics: inliers of tentative matches, -log10 NFA, segvlad z
    assert good.reason.startswith("accepted: ") and "-log10 NFA" in good.reason and " z " in good.reason
    assert good.inliers >= 20 and good.verification_score >= 0.3
    assert bad.reason.startswith("rejected: ")
    assert good.transform is None and "no transform" in good.reason  # no intrinsics given


def test_only_the_best_supported_candidate_is_accepted(built, rtabmap_seq, feats):
    v, _ = built
    near = [m for m in range(N_MAP) if rtabmap_seq.gt[62, m]]
    res = v.verify(cands(62, near, feats))
    acc = [r for r in res if r.accepted]
    assert len(acc) == 1
    others = [r for r in res if not r.accepted and r.reason.startswith("rejected: passed")]
    assert all(f"keyframe {acc[0].candidate.match.id} has more evidence" in r.reason for r in others)


def test_a_loop_needs_a_consistent_one_just_before(rtabmap_seq, feats):
    """With the default consistency, a loop is published only when a keyframe at most 2 before
    it also passed to within 3 keyframes of the same match (real frames of the revisit)."""
    v = Verifier(VerifierParams())
    for i in list(range(N_MAP)) + [56, 58, 60]:
        v.add_keyframe(kf(i), rtabmap_seq.load_rgb(i), feats[i])
    assert rtabmap_seq.gt[58, 17] and rtabmap_seq.gt[60, 20] and not rtabmap_seq.gt[56, 0]
    alone = v.verify(cands(56, [0], feats))[0]        # verified, no pass: nothing to build on
    assert not alone.accepted and not alone.reason.startswith("rejected: passed")
    first = v.verify(cands(58, [17], feats))[0]
    assert not first.accepted and "but not yet consistent" in first.reason, first.reason
    assert "-log10 NFA" in first.reason               # the pair evidence stays in the reason
    ok = v.verify(cands(60, [20], feats))
    assert len(ok) == 1 and ok[0].accepted and "consistent: keyframe 58 passed to 17" in ok[0].reason
    strict = Verifier(VerifierParams(consistency_radius=0))
    strict._entries = v._entries                      # the same stored keyframes
    assert "consistency not checked" in strict.verify(cands(58, [17], feats))[0].reason  # nothing verified near
    assert not strict.verify(cands(60, [20], feats))[0].accepted  # 20 is 3 from 17: outside radius 0


def test_a_withheld_loop_is_confirmed_when_its_predecessor_comes_late(rtabmap_seq, feats):
    """A fleet verifies keyframes out of order (peer data arrives late): a loop withheld for want
    of a consistent predecessor is returned, accepted, by the predecessor's verify()."""
    v = Verifier(VerifierParams())
    for i in list(range(N_MAP)) + [58, 60, 62]:
        v.add_keyframe(kf(i), rtabmap_seq.load_rgb(i), feats[i])
    assert v.verify(cands(62, [22], feats))[0].accepted  # nothing verified near 62 yet: on its own
    held = v.verify(cands(60, [20], feats))[0]           # 62 passed to 22, but 62 is after 60
    assert held.accepted                                 # either side counts: 22 is 2 from 20
    first = v.verify(cands(58, [17], feats))
    assert first[0].accepted and len(first) == 1         # 60 passed to 20, 3 from 17
    w2 = Verifier(VerifierParams())
    w2._entries = v._entries
    w2.verify(cands(62, [0], feats))                     # 62 verified, no pass
    held = w2.verify(cands(60, [20], feats))[0]
    assert not held.accepted and "not yet consistent" in held.reason
    late = w2.verify(cands(58, [17], feats))             # 58 comes late and passes near 20
    assert len(late) == 2 and late[0].accepted
    assert late[1] is held and held.accepted and "(verified after it)" in held.reason, held.reason


def test_consistency_counts_along_each_session_in_interleaved_ids(rtabmap_seq, feats, tmp_path):
    """In a fleet's map a robot's own keyframes and its peer's take turns in the ids. Here the
    peer's (session 2: frames 0..N_MAP-1) have every third id and the robot's own queries
    (session 1: frames 56, 58, 60) ids 5 apart: counted in ids, 58 would have no verified
    neighbour and be accepted on its own, and 60's match (frame 20) would be 9 ids from 58's
    (frame 17). Counted along their sessions, 56 is 58's neighbour and 20 is 3 from 17."""
    v = Verifier(VerifierParams())
    peer = {i: Keyframe(3 * i, i * 10**9, 2) for i in range(N_MAP)}
    own = {q: Keyframe(3 * N_MAP + 1 + 5 * k, q * 10**9, 1) for k, q in enumerate((56, 58, 60))}
    for i, k in list(peer.items()) + list(own.items()):
        v.add_keyframe(k, rtabmap_seq.load_rgb(i), feats[i])

    def ask(q, m):
        return v.verify([Candidate(own[q], peer[m], float(feats[q].descriptor @ feats[m].descriptor), 0)])[0]
    assert not ask(56, 0).accepted
    first = ask(58, 17)
    assert not first.accepted and "but not yet consistent" in first.reason, first.reason
    ok = ask(60, 20)
    assert ok.accepted and f"consistent: keyframe {own[58].id} passed to {peer[17].id}" in ok.reason, ok.reason
    assert v._around(own[58].id, 1) == [own[56].id, own[60].id]
    v.note_keyframe(3 * N_MAP + 2, 2)          # a peer keyframe arrives between 56 and 58: not theirs
    assert v._around(own[58].id, 1) == [own[56].id, own[60].id]
    v.save(tmp_path / "v.verifier")            # the sessions are saved with the state
    back = Verifier.load(tmp_path / "v.verifier")
    assert back._around(own[58].id, 1) == [own[56].id, own[60].id] and back._apart(peer[17].id, peer[20].id) == 3


def test_pose_with_intrinsics(rtabmap_seq, feats):
    K = np.array([[450.0, 0, 256], [0, 450.0, 192], [0, 0, 1]])  # 512x384 images
    v = Verifier(VerifierParams(vocab_keyframes=1000, vocabulary="map", consistency_window=0), Camera(K))
    for i in (20, 60):
        v.add_keyframe(kf(i), rtabmap_seq.load_rgb(i), feats[i])
    (r,) = v.verify(cands(60, [20], feats))
    assert r.accepted and "no segvlad yet (vocabulary after 1000 keyframes, 2 so far)" in r.reason
    R, t = r.transform.rotation, r.transform.translation
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-6) and np.isclose(np.linalg.det(R), 1.0)
    assert np.isclose(np.linalg.norm(t), 1.0) and not r.transform.metric_scale
    assert np.all(np.diag(r.transform.covariance) > 0)


def test_unknown_keyframe_is_rejected_not_crashed(built, feats):
    v, _ = built
    (r,) = v.verify([Candidate(kf(60), kf(999), 0.9, 0)])
    assert not r.accepted and "keyframe 999 was never added" in r.reason
    with pytest.raises(ValueError):
        v.verify([Candidate(kf(60), kf(1), 0.9, 0), Candidate(kf(62), kf(1), 0.9, 0)])


def test_storage_per_keyframe_is_bounded(built):
    v, _ = built
    p = v.params
    sift = p.max_keypoints * (128 + 8)
    segv = p.max_supersegments * p.pca_dim * 2
    assert 0 < v.bytes_per_keyframe() <= sift + segv
    for e in v._entries.values():
        assert e.pending_patches is None and e.supersegments.dtype == np.float16


def test_save_load_round_trip_and_bad_files(built, feats, tmp_path):
    v, _ = built
    path = tmp_path / "verifier.npz"
    v.save(path)
    w = Verifier.load(path)
    c = cands(60, [20, 35, 5], feats)
    for a, b in zip(v.verify(c), w.verify(c)):
        assert (a.accepted, a.inliers, a.reason) == (b.accepted, b.inliers, b.reason)
        assert a.verification_score == pytest.approx(b.verification_score, abs=1e-6)
    assert w.params == v.params and len(w) == len(v)

    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(MapFileError, match="truncated"):
        Verifier.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "foreign.npz", x=np.arange(3))
    with pytest.raises(MapFileError, match="not a megaloc_ros verifier state"):
        Verifier.load(tmp_path / "foreign.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(MapFileError):
        Verifier.load(tmp_path / "text.npz")
    with pytest.raises(MapFileError, match="no such"):
        Verifier.load(tmp_path / "missing.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.npz", "foreign.npz", "text.npz",
                                                          "verifier.npz"]  # no temp left


def test_pending_keyframes_survive_save_load(rtabmap_seq, feats, tmp_path):
    v = Verifier(VerifierParams(vocab_keyframes=3, vocabulary="map"))
    for i in (0, 1):
        v.add_keyframe(kf(i), rtabmap_seq.load_rgb(i), feats[i])
    v.save(tmp_path / "p.npz")
    w = Verifier.load(tmp_path / "p.npz")
    assert not w.has_vocabulary
    w.add_keyframe(kf(2), rtabmap_seq.load_rgb(2), feats[2])
    assert w.has_vocabulary and all(e.supersegments is not None for e in w._entries.values())


def test_rtabmap_verification_reaches_full_precision_and_more_recall(feats):
    """The issue's claim on real data, through the same code as `megaloc-ros bench verify`."""
    from megaloc_ros.bench import verify
    r = verify.run("rtabmap", features=feats)
    rows = r["rows"]
    glob, ver, topk = rows["global only"], rows["global + verification"], rows["top-k + verification"]
    # measured: global 0.37 precision / 0.59 R@100P; top-k verified 1.0 precision, 0.91 R@100P.
    # Verifying only the detector's published candidates (not what the pipeline does: it verifies
    # the top-k) accepts one near-miss, frame 67 -> 32 (32/48 inliers, -log10 NFA 21: the same
    # hallway, 3 frames from the marked match 29, which that row never sees)
    assert glob["precision"] < 1.0
    assert topk["precision"] == 1.0 and ver["false_loops"] <= 1
    assert topk["recall"] >= glob["recall"]  # full precision at (at least) the detector's recall
    assert topk["recall_at_100_precision"] >= glob["recall_at_100_precision"] + 0.1
    assert r["bytes_per_keyframe"] < 100_000


def test_bad_parameters_are_refused_with_the_reason():
    from megaloc_ros.errors import MegalocError
    from megaloc_ros.verification.segments import SegmentParams
    with pytest.raises(MegalocError, match="verifier.local_features must be one of sift, orb, xfeat; got 'surf'"):
        VerifierParams(local_features="surf")
    with pytest.raises(MegalocError, match=r"verifier.ratio must be in \[0.01, 1.0\]"):
        VerifierParams(ratio=1.5)
    with pytest.raises(MegalocError, match="verifier.min_segvlad_score"):
        VerifierParams(min_segvlad_score=2.0)
    with pytest.raises(MegalocError, match="verifier.segments.n_segments"):
        VerifierParams(segments=SegmentParams(n_segments=0))


def test_states_of_flat_segment_fields_load_into_segments():
    """Verifier states saved before segmentation was nested name its fields flat."""
    old = {"segment_method": "felzenszwalb", "segment_max_side": 120, "n_segments": 30,
           "sam_encoder": "", "sam_decoder": "", "min_inliers": 25}
    p = VerifierParams.from_dict(old)
    assert (p.segments.method, p.segments.max_side, p.segments.n_segments, p.min_inliers) == \
        ("felzenszwalb", 120, 30, 25)
    import dataclasses
    assert VerifierParams.from_dict(dataclasses.asdict(p)) == p
    with pytest.raises(ValueError, match="unknown verifier parameters"):
        VerifierParams.from_dict({"segment_count": 3})


def test_a_second_backbone_supplies_patch_features(rtabmap_seq, feats):
    """Keyframes without exported patch features still get SegVLAD from ``segvlad_model``."""
    from megaloc_ros.encoding.loader import offline_model_path
    from megaloc_ros.types import ImageFeatures
    v = Verifier(VerifierParams(segvlad_model=str(offline_model_path()), vocab_keyframes=3))
    for i in (0, 1, 2):
        v.add_keyframe(kf(i), rtabmap_seq.load_rgb(i), ImageFeatures(feats[i].descriptor, None))
    assert v.has_vocabulary
    assert all(e.supersegments is not None for e in v._entries.values())


def test_a_jpeg_given_as_verifier_state_is_refused_plainly(tmp_path):
    from megaloc_ros.errors import MapFileError
    from megaloc_ros.verification.verifier import Verifier
    bad = tmp_path / "photo.verifier"
    bad.write_bytes((Path(__file__).resolve().parents[1] / "data" / "rtabmap" / "1.jpg").read_bytes())
    with pytest.raises(MapFileError, match="not a megaloc_ros verifier state") as e:
        Verifier.load(bad)
    assert "pickle" not in str(e.value)


def test_a_wide_angle_lens_needs_its_distortion_undone(tmp_path):
    """The synthetic two-view scene through a wide-angle lens (plumb_bob, edges moved up to ~50
    px): told the distortion, the verifier recovers the rotation to a fraction of a degree;
    ignoring it, the same 140+ inliers give a rotation ~11 deg off. The model is saved with the
    state."""
    from test_geometry import K, WIDE, _distort, angle_deg, two_view_scene
    from megaloc_ros.verification.geometry import Distortion
    from megaloc_ros.verification.verifier import _Entry
    d = Distortion("plumb_bob", WIDE["plumb_bob"])
    q, m, R, _ = two_view_scene()
    eq, em = _Entry((640, 480), _distort(q, d)), _Entry((640, 480), _distort(m, d))
    errors = {}
    for name, dist in (("given", d), ("ignored", None)):
        chk = Verifier(VerifierParams(), Camera(K, (640, 480), dist)).check_geometry(eq, em).check
        assert chk.inliers >= 130
        errors[name] = angle_deg(chk.pose.rotation, R)
    assert errors["given"] < 0.5 and errors["ignored"] > 5.0, errors   # measured 0.08 and 11.3
    v = Verifier(VerifierParams(), Camera(K, (640, 480), d))
    v.save(tmp_path / "s.verifier")
    assert Verifier.load(tmp_path / "s.verifier").camera == Camera(K, (640, 480), d)
    # a camera given at load time replaces the saved one, distortion included
    assert Verifier.load(tmp_path / "s.verifier", Camera(K)).camera.distortion is None
