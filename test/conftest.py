"""Shared fixtures. Real data comes from the repository's data/ (see data/README.md)."""
from __future__ import annotations

import pytest

from megaloc_ros.io import datasets


@pytest.fixture(scope="session")
def rtabmap_seq():
    return datasets.rtabmap()


@pytest.fixture(scope="session")
def corridor_seq():
    return datasets.corridor()


# --- encoder fixtures (real model: MegaLoc if exported, else the offline DINOv2 ViT-S/14) -------
@pytest.fixture(scope="session")
def real_encoder():
    """The encoder `load_encoder()` picks; features of the shipped sets are cached on disk
    (.cache/features/, keyed by model and image hashes) so reruns are fast."""
    from megaloc_ros.encoding.loader import load_encoder
    return load_encoder(device="cpu")


@pytest.fixture(scope="session")
def rtabmap_features(real_encoder, rtabmap_seq):
    """list[ImageFeatures], one per rtabmap frame, from `real_encoder`."""
    from megaloc_ros.encoding.encoder import encode_files
    return encode_files(real_encoder, rtabmap_seq.image_paths)


@pytest.fixture(scope="session")
def corridor_features(real_encoder, corridor_seq):
    """list[ImageFeatures], one per corridor frame (reference then query), from `real_encoder`."""
    from megaloc_ros.encoding.encoder import encode_files
    return encode_files(real_encoder, corridor_seq.image_paths)
