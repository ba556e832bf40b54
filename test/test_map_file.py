"""Map files: round trips, rejection of foreign/truncated/corrupt/other-model files, atomic
writes, and multi-session relocalisation (reload and continue == never stopped)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from megaloc_ros.io import files
from megaloc_ros.mapping import map_file
from megaloc_ros.mapping.detector import DetectorParams, LoopDetector
from megaloc_ros.errors import MapFileError
from megaloc_ros.mapping.place_map import MapSettings, PlaceMap
from megaloc_ros.types import Keyframe
from synthetic import trajectory

S = 1_000_000_000


def built(kind="flat", n=300, dim=64, **opts):
    m = PlaceMap(dim, "model-a", MapSettings(index=kind, **opts))
    x = trajectory(n, dim)
    pose = np.eye(4)
    for i, d in enumerate(x):
        pose[0, 3] = i
        m.add(Keyframe(i, i * S, i // 200, f"cam{i % 2}", pose.copy() if i % 3 == 0 else None), d)
    m.extras["vocabulary"] = np.arange(12, dtype=np.float32).reshape(3, 4)
    m.extras["counts"] = np.array([1, 2, 3], np.int64)
    return m, x


def same_answers(a, b, queries, k=5):
    for q in queries:
        ha, hb = a.search(q, k), b.search(q, k)
        assert [kf.id for kf, _ in ha] == [kf.id for kf, _ in hb]
        np.testing.assert_allclose([s for _, s in ha], [s for _, s in hb], atol=1e-6)


@pytest.mark.parametrize("kind,opts", [("flat", {}),
                                       ("ivfpq", dict(pca_dim=32, pq_m=8, nlist=8, train_size=256)),
                                       ("ivfpq", dict(pca_dim=32, pq_m=8, pq_bits=8, nlist=8, train_size=256)),
                                       ("hnsw", dict(pca_dim=32, train_size=256))])
def test_round_trip(tmp_path, kind, opts):
    m, x = built(kind, **opts)
    assert m.trained
    path = tmp_path / "a.map"
    m.save(path)
    r = PlaceMap.load(path, expected_model="model-a", expected_dim=64)
    assert (len(r), r.dim, r.model_name, r.settings) == (300, 64, "model-a", m.settings)
    assert [vars(k) is not None for k in r.keyframes()]
    for i in (0, 3, 150, 299):
        a, b = m.keyframe(i), r.keyframe(i)
        assert (a.id, a.stamp_ns, a.session, a.frame_id) == (b.id, b.stamp_ns, b.session, b.frame_id)
        assert (a.pose is None) == (b.pose is None)
        if a.pose is not None:
            np.testing.assert_array_equal(a.pose, b.pose)
    same_answers(m, r, x[::37])
    assert set(r.extras) == {"vocabulary", "counts"}
    np.testing.assert_array_equal(r.extras["vocabulary"], m.extras["vocabulary"])
    assert r.extras["counts"].dtype == np.int64
    assert not [f for f in os.listdir(tmp_path) if f != "a.map"]  # no temporary left behind


def test_map_from_before_pq_bits_loads_as_8_bit_pq(tmp_path):
    m, x = built("ivfpq", pca_dim=32, pq_m=8, pq_bits=8, nlist=8, train_size=256)
    m.save(tmp_path / "new.map")
    # what a file written before the option existed carries: its options without pq_bits
    rewrite_header(tmp_path / "new.map", tmp_path / "old.map", lambda h: h["options"].pop("pq_bits"))
    r = PlaceMap.load(tmp_path / "old.map")
    assert r.settings.pq_bits == 8 and r.memory_bytes()["index"] == m.memory_bytes()["index"]
    same_answers(m, r, x[::37])


def test_map_settings_round_trip_and_unknown_options_of_other_versions_are_dropped(tmp_path):
    m, x = built("hnsw", pca_dim=32, train_size=256, hnsw_m=16, ef_search=64)
    m.save(tmp_path / "a.map")
    assert PlaceMap.load(tmp_path / "a.map").settings == m.settings
    rewrite_header(tmp_path / "a.map", tmp_path / "b.map", lambda h: h["options"].update(future_knob=3))
    r = PlaceMap.load(tmp_path / "b.map")
    assert r.settings == m.settings
    same_answers(m, r, x[::37])


def rewrite_header(src, dst, change) -> None:
    """Copy a map file with ``change(header)`` applied (checksum recomputed), as another
    version of the writer would have written it."""
    import hashlib
    import json
    header, payload = map_file.read_header(src)
    change(header)
    h = json.dumps(header).encode()
    body = map_file._PREFIX.pack(map_file.MAGIC, map_file.FORMAT_VERSION, len(h)) + h + payload
    dst.write_bytes(body + hashlib.sha256(body).digest())


def test_untrained_compressed_map_round_trips_and_trains_later(tmp_path):
    x = trajectory(400, 64)
    a = PlaceMap(64, "model-a", MapSettings(index="ivfsq8", pca_dim=32, nlist=8, train_size=300))
    for i in range(200):
        a.add(Keyframe(i, i), x[i])
    a.save(tmp_path / "a.map")
    b = PlaceMap.load(tmp_path / "a.map")
    for i in range(200, 400):
        a.add(Keyframe(i, i), x[i])
        b.add(Keyframe(i, i), x[i])
    assert a.trained and b.trained
    same_answers(a, b, x[::23])


def test_other_model_or_size_is_refused_naming_both(tmp_path):
    m, _ = built()
    m.save(tmp_path / "a.map")
    with pytest.raises(MapFileError, match=r"'model-a' \(64-D.*'model-b' \(64-D"):
        PlaceMap.load(tmp_path / "a.map", expected_model="model-b")
    with pytest.raises(MapFileError, match=r"64-D.*8448-D"):
        PlaceMap.load(tmp_path / "a.map", expected_model="model-a", expected_dim=8448)


def test_foreign_truncated_and_corrupt_files_are_refused(tmp_path):
    m, _ = built()
    good = tmp_path / "a.map"
    m.save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.map"

    def refused(content, pattern):
        bad.write_bytes(content)
        with pytest.raises(MapFileError, match=pattern):
            PlaceMap.load(bad)

    refused(b"", "not a megaloc_ros map")
    refused(b"\x89PNG\r\n\x1a\n" + bytes(100), "not a megaloc_ros map")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    refused((tmp_path / "arrays.npz").read_bytes(), "not a megaloc_ros map")
    for cut in (10, 40, len(data) // 2, len(data) - 1):
        refused(data[:cut], "truncated")
    refused(data + b"x", "trailing")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    refused(bytes(flipped), "checksum")
    newer = bytearray(data)
    newer[8] = 99
    refused(bytes(newer), "format v99")
    with pytest.raises(MapFileError, match="cannot read"):
        PlaceMap.load(tmp_path / "missing.map")


def test_extras_must_be_numeric(tmp_path):
    m, _ = built()
    m.extras["labels"] = np.array(["a", object()], dtype=object)
    with pytest.raises(MapFileError, match="numbers only"):
        m.save(tmp_path / "a.map")
    assert not os.listdir(tmp_path)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A disk error during save (caused here by a failing fsync: a real full disk cannot be made
    in a test) leaves the old map readable and no temporary file behind."""
    m, x = built()
    path = tmp_path / "a.map"
    m.save(path)
    before = path.read_bytes()
    m.add(Keyframe(1000, 1000 * S), x[0])

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        m.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.map"]
    assert len(PlaceMap.load(path)) == 300


def test_multi_session_relocalisation_equals_never_stopping(tmp_path):
    """Day 1: build a map; save; day 2: a new process loads it and continues. Its keyframe ids,
    retrievals and loop decisions equal those of a detector that never stopped."""
    dim = 64
    day1 = trajectory(150, dim, seed=1)
    noise = np.random.default_rng(2).standard_normal((150, dim)).astype(np.float32) * 0.02
    day2 = np.concatenate([day1[20:120] + noise[:100], trajectory(50, dim, seed=9)])
    params = DetectorParams(similarity_threshold=0.8, min_keyframe_interval_s=0.0,
                            max_similarity_to_last=1.0)

    def run(det, x, session, t0):
        return [det.process(d, t0 + i * S, session=session) for i, d in enumerate(x)]

    continuous = LoopDetector(PlaceMap(dim, "model-a"), params)
    run(continuous, day1, 0, 0)
    ref = run(continuous, day2, 1, 86400 * S)

    first = LoopDetector(PlaceMap(dim, "model-a"), params)
    run(first, day1, 0, 0)
    first.map.save(tmp_path / "day1.map")
    resumed = LoopDetector(PlaceMap.load(tmp_path / "day1.map", "model-a", dim), params)
    assert resumed.next_id == 150
    got = run(resumed, day2, 1, 86400 * S)

    def summary(dets):
        return [(d.keyframe.id, [(c.match.id, round(c.score, 5)) for c in d.retrieved],
                 [c.match.id for c in d.candidates]) for d in dets]

    assert summary(got) == summary(ref)
    # and it did relocalise: most revisits of day 1 are reported against day-1 keyframes
    loops = [d for d in got[:100] if d.candidates]
    assert len(loops) >= 80
    assert all(c.match.session == 0 for d in loops for c in d.candidates)
    assert np.mean([abs(d.candidates[0].match.id - (20 + i)) <= 2
                    for i, d in enumerate(got[:100]) if d.candidates]) >= 0.95
