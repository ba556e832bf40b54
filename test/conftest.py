"""Shared fixtures. Real data comes from the repository's data/ (see data/README.md)."""
from __future__ import annotations

import pytest

from megaloc_ros import datasets


@pytest.fixture(scope="session")
def rtabmap_seq():
    return datasets.rtabmap()


@pytest.fixture(scope="session")
def corridor_seq():
    return datasets.corridor()
