"""PlaceMap: exact and compressed search, exclusions, training fallback, metadata."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from megaloc_ros.errors import DescriptorSizeError, MegalocError
from megaloc_ros.mapping.place_map import DuplicateId, MapSettings, PlaceMap
from megaloc_ros.types import Keyframe
from synthetic import trajectory

S = 1_000_000_000


def unit_rows(n, dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(pmap, x, session=0, start=0):
    for i, d in enumerate(x):
        pmap.add(Keyframe(start + i, (start + i) * S, session, "cam"), d)


def test_flat_search_is_exact_and_sorted():
    x = unit_rows(500, 64)
    m = PlaceMap(64, "test")
    fill(m, x)
    q = x[17] + 0.05 * unit_rows(1, 64, 1)[0]
    hits = m.search(q, 10)
    exact = np.argsort(-(x @ (q / np.linalg.norm(q))))[:10]
    assert [kf.id for kf, _ in hits] == list(exact)
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and hits[0][0].id == 17
    assert len(m) == 500 and m.next_id == 500
    np.testing.assert_allclose(m.descriptor(17), x[17], atol=1e-6)
    assert m.keyframe(17).stamp_ns == 17 * S and m.keyframe(17).frame_id == "cam"
    assert [k.id for k in m.keyframes()] == list(range(500))


def test_exclusions_by_id_stamp_and_session():
    x = unit_rows(300, 32)
    m = PlaceMap(32, "test")
    fill(m, x[:150], session=0)
    fill(m, x[150:], session=1, start=150)
    q = x[160]
    ids = lambda hits: {kf.id for kf, _ in hits}  # noqa: E731
    assert 160 in ids(m.search(q, 5))
    r = ids(m.search(q, 300, exclude_ids=(155, 170)))
    assert r.isdisjoint(range(155, 171)) and len(r) == 300 - 16
    r = ids(m.search(q, 300, exclude_stamps=(155 * S, 170 * S)))
    assert r.isdisjoint(range(155, 171))
    # windows restricted to session 1 leave session 0 alone
    r = ids(m.search(q, 300, exclude_ids=(100, 200), exclude_window_session=1))
    assert set(range(100, 150)) <= r and r.isdisjoint(range(150, 201))
    assert ids(m.search(q, 300, exclude_sessions=[1])) == set(range(150))
    assert ids(m.search(q, 300, only_sessions=[1])) == set(range(150, 300))
    # k larger than what survives: everything that survives, nothing else
    assert len(m.search(q, 1000, exclude_ids=(0, 289))) == 10


def test_bad_input_leaves_map_unchanged():
    m = PlaceMap(16, "test")
    fill(m, unit_rows(3, 16))
    with pytest.raises(DescriptorSizeError, match="17 values"):
        m.add(Keyframe(9, 0), np.ones(17))
    with pytest.raises(DescriptorSizeError):
        m.add(Keyframe(9, 0), np.full(16, np.nan))
    with pytest.raises(DuplicateId, match="already"):
        m.add(Keyframe(1, 0), np.ones(16))
    assert isinstance(DuplicateId("x"), MegalocError)
    with pytest.raises(MegalocError, match="4x4"):
        m.add(Keyframe(9, 0, pose=np.eye(3)), np.ones(16))
    assert len(m) == 3
    with pytest.raises(MegalocError, match="map.index must be one of flat"):
        PlaceMap(16, "test", MapSettings(index="lsh"))
    with pytest.raises(TypeError, match="nprobes"):
        MapSettings(nprobes=3)


def test_ids_out_of_order_and_poses():
    m = PlaceMap(8, "test")
    x = unit_rows(4, 8)
    pose = np.eye(4)
    pose[:3, 3] = [1, 2, 3]
    for kid, d in zip([10, 3, 7, 1], x):
        m.add(Keyframe(kid, kid, 0, "cam", pose if kid == 7 else None), d)
    assert m.next_id == 11 and 3 in m and 4 not in m
    np.testing.assert_array_equal(m.keyframe(7).pose, pose)
    assert m.keyframe(3).pose is None
    assert m.search(x[2], 1)[0][0].id == 7
    with pytest.raises(DuplicateId):
        m.add(Keyframe(3, 0), x[0])


def compressed(**kw):
    opts = dict(pca_dim=64, nlist=8, nprobe=8, pq_m=16, train_size=400)
    opts.update(kw)
    return PlaceMap(128, "test", MapSettings(index=opts.pop("index", "ivfpq"), **opts))


@pytest.mark.parametrize("kind", ["ivfpq", "ivfsq8", "hnsw", "sq8"])
def test_compressed_kinds_answer_exactly_until_trained_then_from_codes(kind):
    x = trajectory(1000, 128)
    m, ref = compressed(index=kind), PlaceMap(128, "test")
    fill(m, x[:399])
    fill(ref, x[:399])
    assert not m.trained
    for i in (5, 200, 398):  # untrained: the exact fallback gives the exact answer
        assert m.search(x[i], 3) == ref.search(x[i], 3)
    assert m.descriptor(5) is not None
    fill(m, x[399:], start=399)
    fill(ref, x[399:], start=399)
    assert m.trained and len(m) == 1000 and m.descriptor(5) is None
    queries = trajectory(1000, 128)[::7] + 0.02 * unit_rows(143, 128, 4)  # revisits
    agree = [m.search(q, 1)[0][0].id == ref.search(q, 1)[0][0].id for q in queries]
    assert np.mean(agree) >= 0.9  # recall@1 against exact search
    mem = m.memory_bytes()
    assert mem["index"] < 1000 * 128 * 4  # smaller than the raw descriptors


def test_memory_counts_codes_ids_rerank_codes_projection_and_metadata():
    x = trajectory(1000, 128)
    sizes = {}
    for bits in (4, 8):
        m = compressed(pq_bits=bits, train_size=1000)
        m.add_many([Keyframe(i, i * S, 0, "cam") for i in range(1000)], x)
        assert m.trained
        mem = m.memory_bytes()
        code = 16 * bits // 8
        # per keyframe at least: PQ code, 8-byte id, 64 B of 8-bit re-rank code; plus the projection
        assert mem["index"] >= 1000 * (code + 8 + 64) + 128 * 64 * 4
        assert mem["metadata"] >= 1000 * (8 + 8 + 4 + 4)
        sizes[bits] = mem["index"]
    assert sizes[8] - sizes[4] >= 1000 * 8  # 4-bit codes: 8 B less per keyframe at pq_m=16
    with pytest.raises(MegalocError, match="pq_bits"):
        compressed(pq_bits=6)


def test_compressed_search_honours_exclusions_with_a_bounded_shortlist():
    x = trajectory(1000, 128)
    m, ref = compressed(train_size=1000), PlaceMap(128, "test")
    for pm in (m, ref):
        pm.add_many([Keyframe(i, i * S, 0, "cam") for i in range(1000)], x)
    assert m.trained
    agree = 0
    for i in range(0, 1000, 10):
        window = (max(0, i - 60), i + 60)
        got = m.search(x[i], 5, exclude_ids=window)
        assert len(got) == 5 and all(not window[0] <= kf.id <= window[1] for kf, _ in got)
        agree += got[0][0].id == ref.search(x[i], 5, exclude_ids=window)[0][0].id
    assert agree >= 90
    # the 121-keyframe window widens the shortlist by one place per excluded keyframe, not by
    # refine_factor places each
    fetch = 5 + m._window_count((400, 520), None)
    assert m._refine_params(5, fetch).k_factor * fetch == pytest.approx(100 * 5 + fetch - 5)
    assert m._refine_params(5, 5).k_factor == pytest.approx(100)


def test_keep_descriptors_and_search_options():
    x = trajectory(500, 128)
    m = compressed(keep_descriptors=True)
    fill(m, x)
    assert m.trained
    np.testing.assert_allclose(m.descriptor(450), x[450], atol=1e-6)
    m.set_search_options(nprobe=1, refine_factor=1)
    assert (m.settings.nprobe, m.settings.refine_factor) == (1, 1)
    with pytest.raises(MegalocError, match="query-time"):
        m.set_search_options(pca_dim=3)


def test_background_training_keeps_answering_and_loses_no_keyframe():
    x = trajectory(1500, 128, seed=3)
    m = compressed(background_training=True)
    fill(m, x[:400])  # reaches train_size: training starts in a thread
    errors = []

    def writer():
        try:
            fill(m, x[400:], start=400)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    answered = 0
    while t.is_alive():
        assert m.search(x[10], 1)  # never blocked into an empty answer
        answered += 1
    t.join()
    assert not errors
    assert m.wait_trained(60)
    assert len(m) == 1500 and m._index.ntotal == 1500
    # keyframes added while training are searchable too
    found = np.mean([m.search(x[i], 1)[0][0].id == i for i in range(400, 1500, 11)])
    assert found >= 0.95 and answered > 0


def test_add_many_matches_add():
    x = trajectory(600, 128, seed=5)
    a, b = compressed(), compressed()
    fill(a, x)
    b.add_many([Keyframe(i, i * S, 0, "cam") for i in range(600)], x)
    for i in (0, 300, 599):
        assert [k.id for k, _ in a.search(x[i], 5)] == [k.id for k, _ in b.search(x[i], 5)]
    with pytest.raises(DuplicateId):
        b.add_many([Keyframe(5, 0)], x[:1])


def test_bench_map_runs_small_and_prints_the_columns(capsys, tmp_path):
    from megaloc_ros.cli import main
    rc = main(["bench", "map", "--sizes", "2000,4000", "--chunk", "1000", "--dim", "256",
               "--pca-dim", "64", "--pq-m", "8", "--nlist", "16", "--queries", "30",
               "--train-max", "2000", "--adds", "10", "--flat-queries", "5",
               "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert rc == 0
    header = [line for line in out.splitlines() if "query_ms_p50" in line][0]
    for col in ("query_ms_p50", "query_ms_p99", "add_ms_p50", "add_ms_p99", "recall@1", "B/kf_index",
                "B/kf_meta", "B/kf_total"):
        assert col in header
    import json
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [(r["keyframes"], r["kind"]) for r in rows] == [(2000, "flat"), (2000, "ivfpq"), (4000, "ivfpq")]
    for r in rows[1:]:
        assert 0.5 <= r["recall_at_1"] <= 1.0 and r["add_ms_p50"] is not None
        assert r["index_bytes_per_kf"] < 256 * 4  # compressed: below the raw float32 size
        assert r["bytes_per_kf"] == pytest.approx(r["index_bytes_per_kf"] + r["metadata_bytes_per_kf"])
