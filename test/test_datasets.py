"""The shipped real sequences load with the ground truth their README describes."""
import numpy as np

from megaloc_ros.io import datasets


def test_rtabmap_sequence(rtabmap_seq):
    assert len(rtabmap_seq) == 84
    assert rtabmap_seq.gt.shape == (84, 84)
    assert (rtabmap_seq.gt == rtabmap_seq.gt.T).all() and not rtabmap_seq.gt.diagonal().any()
    assert rtabmap_seq.gt.sum() == 2 * 228
    # frames 41-80 revisit 1-40: frame 45 (index 44) sees frame 5 (index 4)
    assert rtabmap_seq.gt[44, 4]
    assert not rtabmap_seq.gt[:40, :40].any()
    assert rtabmap_seq.load_rgb(83).shape == (384, 512, 3)


def test_corridor_two_sessions(corridor_seq):
    assert len(corridor_seq) == 222
    assert list(np.unique(corridor_seq.sessions)) == [0, 1]
    assert (np.diff(corridor_seq.stamps_ns) > 0).all()
    q0 = 111  # first query frame
    assert set(np.nonzero(corridor_seq.gt[q0])[0]) == {0, 1, 2}
    assert not corridor_seq.gt[:111, :111].any() and not corridor_seq.gt[111:, 111:].any()
    # ... because the set labels query-reference pairs only, not because no place is passed twice
    assert corridor_seq.labeled[0, 111] and not corridor_seq.labeled[40, 88]
    assert not corridor_seq.labeled[111:, 111:].any()


def test_missing_data_dir_is_a_clear_error(tmp_path):
    import pytest
    from megaloc_ros.errors import MegalocError
    with pytest.raises(MegalocError, match="not found"):
        datasets.rtabmap(tmp_path)
