"""SegVLAD pieces with known answers."""
import numpy as np
import pytest

from megaloc_ros.verification import segvlad


def edges(adj):
    return {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(adj)))}


def test_delaunay_adjacency_of_a_square_with_centre():
    # corners 0..3 and a centre 4: the centre links to every corner, corners link along the
    # sides only (each diagonal passes through the centre).
    pts = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], float)
    adj = segvlad.delaunay_adjacency(pts)
    assert np.array_equal(adj, adj.T) and not adj.diagonal().any()
    assert edges(adj) == {(0, 1), (0, 2), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4)}


def test_adjacency_of_a_known_segment_layout():
    # Five segments of a 40x40 label map: four 20x20 quadrants and a 10x10 centre square
    # overwriting their inner corners. Centroids: quadrants pulled away from the centre, which
    # sits at (19.5, 19.5); the triangulation is the square-with-centre one above.
    lab = np.zeros((40, 40), np.int32)
    lab[:20, 20:] = 1
    lab[20:, :20] = 2
    lab[20:, 20:] = 3
    lab[15:25, 15:25] = 4
    c = segvlad.segment_centroids(lab)
    assert np.allclose(c[4], [19.5, 19.5])
    q0 = np.argwhere(lab == 0).mean(axis=0)[::-1]
    assert np.allclose(c[0], q0)
    assert edges(segvlad.delaunay_adjacency(c)) == {(0, 1), (0, 2), (1, 3), (2, 3),
                                                    (0, 4), (1, 4), (2, 4), (3, 4)}


def test_degenerate_layouts():
    assert segvlad.delaunay_adjacency(np.zeros((1, 2))).sum() == 0
    two = segvlad.delaunay_adjacency(np.array([[0, 0], [1, 0]], float))
    assert edges(two) == {(0, 1)}
    line = segvlad.delaunay_adjacency(np.array([[0, 0], [2, 0], [1, 0]], float))
    assert edges(line) == {(0, 2), (1, 2)}  # collinear: chained in x order


@pytest.mark.parametrize("order,expected", [
    (0, [{0}, {1}, {2}, {3}, {4}, {5}]),
    (1, [{0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5}]),
    (2, [{0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {1, 2, 3, 4, 5}, {2, 3, 4, 5}, {3, 4, 5}]),
    (3, [{0, 1, 2, 3}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5},
         {1, 2, 3, 4, 5}, {2, 3, 4, 5}]),
])
def test_supersegment_expansion_on_a_path(order, expected):
    adj = np.zeros((6, 6), bool)
    for i in range(5):
        adj[i, i + 1] = adj[i + 1, i] = True
    ss = segvlad.supersegments(adj, order)
    assert [set(np.flatnonzero(r).tolist()) for r in ss] == expected


def test_supersegment_expansion_on_the_square_with_centre():
    adj = segvlad.delaunay_adjacency(np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], float))
    assert segvlad.supersegments(adj, 1)[0].tolist() == [True, True, True, False, True]
    assert segvlad.supersegments(adj, 2).all()  # every corner reaches the opposite via the centre


def test_patch_membership_is_area_fraction():
    lab = np.zeros((4, 4), np.int32)
    lab[:, 3] = 1  # right column: half of the right patch cells of a 2x2 grid
    m = segvlad.patch_membership(lab, (2, 2))
    assert np.allclose(m, [[1, 0.5, 1, 0.5], [0, 0.5, 0, 0.5]])
    assert np.allclose(m.sum(axis=0), 1)


def test_vlad_of_a_hand_made_feature_set():
    c = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    f = np.array([[0.8, 0.6, 0], [0.6, 0, 0.8], [0, 0.6, 0.8]], np.float32)
    # assignments: c0, c0, c1. Residual sums: c0 (-0.2,0.6,0)+(-0.4,0,0.8) = (-0.6,0.6,0.8);
    # c1: (0,-0.4,0.8). Intra-normalise each block, then the whole vector (two unit blocks).
    b0 = np.array([-0.6, 0.6, 0.8]) / np.sqrt(1.36)
    b1 = np.array([0, -0.4, 0.8]) / np.sqrt(0.8)
    weights = np.array([[1, 1, 1], [0, 0, 1], [0, 0, 0]], np.float32)
    v = segvlad.vlad(f, weights, c)
    assert v.shape == (3, 6)
    assert np.allclose(v[0], np.concatenate([b0, b1]) / np.sqrt(2), atol=1e-6)
    assert np.allclose(v[1], np.concatenate([[0, 0, 0], b1]), atol=1e-6)  # only feature 2
    assert np.allclose(v[2], 0)  # empty set
    # features are L2-normalised first: scaling a feature changes nothing
    assert np.allclose(segvlad.vlad(f * 5, weights, c), v, atol=1e-6)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4]
    x = np.concatenate([c + 0.05 * rng.standard_normal((100, 8)) for c in centres]).astype(np.float32)
    km = segvlad.kmeans(x, 4)
    assert np.allclose(np.sort(np.max(km @ centres.T, axis=0)), 1, atol=0.02)


def test_pca_keeps_cosines_of_data_in_a_subspace():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((50, 5)))[0].T  # 5 directions in 50-D
    x = rng.standard_normal((200, 5)) @ basis + 3.0
    pca = segvlad.Pca.fit(x, 5)
    y = pca.project(x[:10])
    xc = segvlad.normalize_rows(x[:10] - x.mean(axis=0))
    assert np.allclose(y @ y.T, xc @ xc.T, atol=1e-4)
    w = segvlad.Pca.fit(x, 5, whiten=True)
    z = (x - w.mean) @ w.components.T * w.scale
    assert np.allclose(np.cov(z.T), np.eye(5), atol=0.05)


def test_vote_weights_by_similarity():
    q = np.eye(4, dtype=np.float32)[:2]                     # two query SuperSegments
    a = np.eye(4, dtype=np.float32)[:2]                     # image A holds both exactly
    b = segvlad.normalize_rows(np.array([[1, 1, 0, 0]], np.float32))  # image B: cos 0.707 to each
    s = segvlad.vote(q, [a, b], top_k=1)
    assert np.allclose(s, [1.0, 0.0])
    s2 = segvlad.vote(q, [a, b], top_k=2)
    # each query segment: top-2 = its exact match in A (1.0) and B (0.707)
    assert np.allclose(s2, [2 * 1.0 / 4, 2 * np.sqrt(0.5) / 4], atol=1e-6)
    assert np.allclose(segvlad.vote(q, [b], top_k=1), [np.sqrt(0.5)], atol=1e-6)
    assert segvlad.vote(q, []).shape == (0,)
