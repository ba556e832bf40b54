"""`megaloc-ros bench encoder`: encoder speed per runtime/precision, and what precision costs.

Variants, measured in one run on the same images: PyTorch eager fp32, ONNX Runtime fp32 (CPU,
the export as is: the baseline), ONNX Runtime fp32 on the graph fused for the CPU kernels
(attention, GELU, LayerScale; `export.fuse_for_cpu`, shown so the gain of fusion alone is
visible), ONNX Runtime int8 (what `megaloc-ros export --precision int8` writes: that fused graph
with dynamic int8 quantisation of the weight MatMuls), OpenVINO int8 (what `megaloc-ros export
--precision int8 --output FILE.xml` writes: static int8 calibrated on the corridor reference
frames, so rtabmap and the corridor queries are held out) and OpenVINO bf16 (on CPUs with
bfloat16 instructions) when OpenVINO and NNCF are installed,
and, where a CUDA GPU is present, ONNX Runtime CUDA fp32 and TensorRT fp16. Speed: ``--warmup`` then ``--images`` timed
single-image calls (preprocessing included; in blocks per variant, taken in turns),
ms/image and images/s. Agreement with ORT fp32 on
the real shipped sets (rtabmap, corridor): descriptor cosine (mean, min) and top-1 retrieval
agreement (same nearest database frame for every query; how close the changed ones were to a
tie in fp32, and the agreement on the queries that fp32 decides by a margin of at least
``TIE_MARGIN``), plus recall@1 against ground truth
(PyTorch eager, fp32 like the reference and slow, is compared on the timed images only).

Models: by default the one `load_encoder()` would use (MegaLoc when exported, else the offline
DINOv2 ViT-S/14 backbone), exported at --height x --width. ``--arch megaloc-synthetic`` times the
full MegaLoc architecture (ViT-B/14 + SALAD, 8448-D) with random weights: speed only; its
agreement figures describe random weights, not MegaLoc.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

ARCHES = ("auto", "megaloc-synthetic")
TIE_MARGIN = 0.01  # fp32 top-1 minus runner-up below this: a near-tie that any rounding may flip


def add_arguments(p) -> None:
    p.add_argument("--model-path", help="an exported fp32 .onnx (with sidecar); default: see --arch")
    p.add_argument("--arch", choices=ARCHES, default="auto",
                   help="auto: MegaLoc if exported, else the offline DINOv2 ViT-S/14; "
                        "megaloc-synthetic: the MegaLoc architecture with random weights (speed only)")
    p.add_argument("--height", type=int, default=322)
    p.add_argument("--width", type=int, default=322)
    p.add_argument("--images", type=int, default=10, help="timed images per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--agreement-images", type=int, default=0,
                   help="frames per real set for the agreement figures (0: all; -1: skip agreement)")
    p.add_argument("--skip-torch", action="store_true", help="leave out PyTorch eager")
    p.add_argument("--json", help="also write the results here")


def _recall_and_top1(desc: np.ndarray, seq, idx: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Top-1 database index per query, recall@1 and each query's top-1 minus runner-up score
    (rtabmap: +-5 frames excluded; corridor: queries of session 1 against the references of
    session 0)."""
    sim = desc @ desc.T
    gt = seq.gt[np.ix_(idx, idx)]
    sessions = seq.sessions[idx]
    top, hits, margin = [], [], []
    for q in range(len(idx)):
        s = sim[q].copy()
        if sessions.max() > 0:
            if sessions[q] == 0:
                continue
            s[sessions != 0] = -np.inf
        else:
            s[max(0, q - 5):q + 6] = -np.inf
        t = int(np.argmax(s))
        top.append(t)
        runner_up = np.partition(s, -2)[-2] if len(s) > 1 else -np.inf
        margin.append(float(s[t] - runner_up) if np.isfinite(runner_up) else np.inf)
        if gt[q].any():
            hits.append(bool(gt[q, t]))
    return np.array(top), (float(np.mean(hits)) if hits else float("nan")), np.array(margin)


def _time_interleaved(encoders: list, images, warmup: int, n: int, rounds: int = 3) -> list[float]:
    """ms/image per encoder: single-image calls in ``rounds`` rounds, each round a block per
    encoder, so that load from other processes on the machine hits every variant alike (the
    ratios are what matter). Blocks, not alternating calls: the runtimes' worker threads keep
    spinning for a while after a call and would slow whichever variant runs next; the first
    call of each block, after a pause, absorbs that and is not timed."""
    for enc in encoders:
        for i in range(warmup):
            enc.encode([images[i % len(images)]])
    total, done = [0.0] * len(encoders), [0] * len(encoders)
    per_round = [n // rounds + (r < n % rounds) for r in range(rounds)]
    i = 0
    for count in per_round:
        for j, enc in enumerate(encoders):
            time.sleep(0.05)
            enc.encode([images[i % len(images)]])
            for c in range(count):
                t0 = time.perf_counter()
                enc.encode([images[(i + c) % len(images)]])
                total[j] += time.perf_counter() - t0
                done[j] += 1
        i += count
    return [t / max(d, 1) * 1e3 for t, d in zip(total, done)]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _prepare_models(args, log) -> tuple[Path, str]:
    from megaloc_ros.encoding.cache import cache_root
    from megaloc_ros.encoding.loader import find_megaloc_model, offline_model_path
    from megaloc_ros.encoding.export import export_model
    from megaloc_ros.encoding.sidecar import read_sidecar
    size = (args.height, args.width)
    if args.model_path:
        return Path(args.model_path), "given model"
    if args.arch == "megaloc-synthetic":
        import torch
        from megaloc_ros.encoding.model import MegaLoc
        out = cache_root() / "models" / f"bench-megaloc-synthetic-{size[0]}x{size[1]}.onnx"
        if not out.is_file():
            log(f"exporting the MegaLoc architecture with random weights to {out} (once)")
            from safetensors.torch import save_file
            from megaloc_ros.encoding.model.weights import load_megaloc
            torch.manual_seed(0)
            model = MegaLoc().eval()
            with torch.no_grad():  # LayerScale at 1e-5 would make the blocks near-identity
                for b in model.backbone.blocks:
                    b.ls1.gamma.fill_(0.1)
                    b.ls2.gamma.fill_(0.1)
            # saved in the official layout so PyTorch eager runs the same weights
            weights = out.with_suffix(".safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            export_model(load_megaloc(weights), out, height=size[0], width=size[1],
                         model_name="megaloc-synthetic-weights", kind="synthetic", weights_path=weights,
                         check_images=0, log=log)
        return out, "MegaLoc architecture (ViT-B/14 + SALAD), RANDOM weights: speed only"
    found = find_megaloc_model()
    if found is not None and tuple(read_sidecar(found)["input"][k] for k in ("height", "width")) == size:
        return found, "MegaLoc"
    if found is not None:
        log(f"note: {found} is exported at another size; benchmarking the offline backbone at {size}")
    return offline_model_path(size=size), "offline DINOv2 ViT-S/14 backbone (NOT MegaLoc), real weights"


def _derived_model(fp32: Path, precision: str, log) -> Path:
    """``precision`` "int8" (`export.convert_precision`), "int8-openvino" (`export.quantize_openvino`),
    "fp32-openvino" (`export.convert_openvino`) or "fp32-fused" (the same graph fusions as int8, no quantisation: shows how much of the int8
    gain is fusion) next to ``fp32``, cached."""
    import onnx
    from megaloc_ros.encoding.export import (CPU_FUSIONS_VERSION, INT8_METHOD, OPENVINO_VERSION, calibration_images,
                          convert_openvino, convert_precision, fuse_for_cpu, install_model)
    from megaloc_ros.encoding.preprocess import preprocess
    out = fp32.with_name(f"{fp32.stem}-{precision}" + (".xml" if precision.endswith("openvino") else ".onnx"))
    meta = json.loads(fp32.with_suffix(".json").read_text())
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    recipe = {"int8": f"int8: {INT8_METHOD['method']} v{CPU_FUSIONS_VERSION}",
              "int8-openvino": f"int8: NNCF static, OpenVINO IR v{OPENVINO_VERSION}",
              "fp32-openvino": "fp32: OpenVINO IR",
              "fp32-fused": f"fp32: fuse_for_cpu v{CPU_FUSIONS_VERSION}"}[precision]
    if out.is_file() and old.get("derived") == recipe:
        return out
    log(f"building {out.name} from {fp32.name} ({precision})")
    if precision == "int8":
        meta["quantization"] = convert_precision(fp32, out, "int8")
    elif precision.endswith("openvino"):
        tmp = out.with_name(f".{out.stem}.part.xml")
        size = (meta["input"]["height"], meta["input"]["width"])
        calib = preprocess(calibration_images(), size) if precision.startswith("int8") else None
        quant = convert_openvino(fp32, tmp, precision.split("-")[0], calib)
        if quant:
            meta["quantization"] = quant
        meta["runtime"] = "openvino"
        install_model(tmp, out)
    else:
        m = onnx.load(str(fp32))
        meta["graph_fusions"] = fuse_for_cpu(m)
        onnx.save(m, str(out))
    meta["precision"] = precision.split("-")[0]
    meta["check_vs_pytorch"], meta["derived"] = {}, recipe
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return out


def main(args) -> int:
    import onnxruntime as ort
    import torch
    from megaloc_ros.io import datasets
    from megaloc_ros.encoding.encoder import Encoder

    log = print
    fp32_path, what = _prepare_models(args, log)
    base = Encoder(fp32_path, device="cpu")
    variants: list[tuple[str, Encoder]] = []
    if not args.skip_torch:
        try:
            variants.append(("pytorch eager fp32", Encoder(fp32_path, backend="torch", device="cpu")))
        except Exception as exc:  # no source weights for this export
            log(f"(PyTorch eager left out: {exc})")
    variants.append(("onnxruntime fp32 CPU", base))
    variants.append(("ORT fp32 fused CPU", Encoder(_derived_model(fp32_path, "fp32-fused", log), device="cpu")))
    variants.append(("onnxruntime int8 CPU", Encoder(_derived_model(fp32_path, "int8", log), device="cpu")))
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
        variants.append(("OpenVINO int8 CPU", Encoder(_derived_model(fp32_path, "int8-openvino", log), device="cpu")))
        if "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags():
            # float parts in bfloat16: how far plain rounding moves the descriptors and top-1
            variants.append(("OpenVINO bf16 CPU", Encoder(_derived_model(fp32_path, "fp32-openvino", log),
                                                          device="cpu", inference_precision="bf16")))
    except ImportError as exc:
        log(f"(OpenVINO int8 left out: {exc}; `pip install openvino nncf`)")
    gpu = set(ort.get_available_providers())
    if "CUDAExecutionProvider" in gpu:
        variants.append(("onnxruntime fp32 CUDA", Encoder(fp32_path, device="cuda")))
    if "TensorrtExecutionProvider" in gpu:
        variants.append(("onnxruntime TensorRT fp16", Encoder(fp32_path, device="tensorrt")))

    seqs = [datasets.rtabmap(), datasets.corridor()]
    timing_images = [seqs[0].load_rgb(i) for i in range(0, len(seqs[0]), 7)][: max(args.images, 1)]
    print(f"bench encoder: {base.model_name} -- {what}")
    print(f"  input {args.height}x{args.width}, {base.descriptor_dim}-D descriptor, patch grid {base.patch_grid}; "
          f"{args.warmup} warm-up + {args.images} timed single-image calls per variant, in 3 rounds of blocks "
          f"(preprocessing included); "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"onnxruntime {ort.__version__}, providers {', '.join(sorted(gpu))}")

    # agreement sets: every frame of both real sequences (or the first N of each)
    agree = []
    if args.agreement_images >= 0:
        for s in seqs:
            n = len(s) if args.agreement_images == 0 else min(args.agreement_images, len(s))
            idx = np.arange(n) if s.sessions.max() == 0 or n == len(s) else \
                np.concatenate([np.arange(n // 2), np.flatnonzero(s.sessions == 1)[: n - n // 2]])
            agree.append((s, idx, [s.load_rgb(int(i)) for i in idx]))

    times = dict(zip([n for n, _ in variants],
                     _time_interleaved([e for _, e in variants], timing_images, args.warmup, args.images)))
    results, ref_desc, ref_top, ref_margin = [], None, None, None
    for name, enc in [v for v in variants if v[1] is base] + [v for v in variants if v[1] is not base]:
        ms = times[name]
        row = {"variant": name, "providers": enc.providers[0], "ms_per_image": ms, "images_per_s": 1e3 / ms}
        if agree and enc.backend == "torch":
            # fp32 like the reference and slow: compared on the timed images only
            a = np.stack([f.descriptor for f in enc.encode(timing_images)])
            b = np.stack([f.descriptor for f in base.encode(timing_images)])
            cos = (a * b).sum(1)
            row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()))
        elif agree:
            descs = [np.stack([f.descriptor for f in enc.encode(imgs)]) for _, _, imgs in agree]
            tops = [_recall_and_top1(d, s, idx) for d, (s, idx, _) in zip(descs, agree)]
            if ref_desc is None:
                ref_desc, ref_top, ref_margin = descs, [t for t, _, _ in tops], [m for _, _, m in tops]
            cos = np.concatenate([(d * r).sum(1) for d, r in zip(descs, ref_desc)])
            same = [t == r for (t, _, _), r in zip(tops, ref_top)]
            decided = np.concatenate([m >= TIE_MARGIN for m in ref_margin])
            row["top1_same_decided"] = float(np.concatenate(same)[decided].mean()) if decided.any() else None
            row["decided_fraction"] = float(decided.mean())
            # how close to a tie (in fp32 scores) the queries whose top-1 changed were
            margins = []
            for d, (s, idx, _), (t, _, _), r in zip(ref_desc, agree, tops, ref_top):
                qs = np.array([q for q in range(len(idx)) if not (s.sessions.max() > 0 and s.sessions[idx[q]] == 0)])
                flip = np.flatnonzero(t != r)
                margins += [float(d[qs[j]] @ d[r[j]] - d[qs[j]] @ d[t[j]]) for j in flip]
            row["max_fp32_margin_flipped"] = max(margins) if margins else None
            row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                       top1_queries=int(sum(x.size for x in same)),
                       **{f"top1 same {s.name}": float(x.mean()) for (s, _, _), x in zip(agree, same)},
                       **{f"recall@1 {s.name}": r for (s, _, _), (_, r, _) in zip(agree, tops)})
        results.append(row)
    order = {n: i for i, (n, _) in enumerate(variants)}
    results.sort(key=lambda r: order[r["variant"]])
    fp32_ms = next(r["ms_per_image"] for r in results if r["variant"] == "onnxruntime fp32 CPU")

    def cell(r, key, spec, scale=1.0, suffix=""):
        v = r.get(key)
        return f"{'-':>11}" if v is None else f"{format(scale * v, spec)}{suffix}".rjust(11)

    cols = ["variant", "ms/img", "img/s", "x ORT fp32"]
    if agree:
        cols += ["cos mean", "cos min"] + [f"top1={s.name}"[:11] for s, _, _ in agree] + \
                ["top1=decid"] + [f"R@1 {s.name}"[:11] for s, _, _ in agree]
    print("  " + " | ".join(f"{c:>22}" if i == 0 else f"{c[:11]:>11}" for i, c in enumerate(cols)))
    for r in results:
        cells = [f"{r['variant']:>22}", f"{r['ms_per_image']:11.1f}", f"{r['images_per_s']:11.2f}",
                 f"{fp32_ms / r['ms_per_image']:11.2f}"]
        if agree:
            cells += [cell(r, "cos_mean", ".5f"), cell(r, "cos_min", ".5f")]
            cells += [cell(r, f"top1 same {s.name}", ".1f", 100, "%") for s, _, _ in agree]
            cells += [cell(r, "top1_same_decided", ".1f", 100, "%")]
            cells += [cell(r, f"recall@1 {s.name}", ".3f") for s, _, _ in agree]
        print("  " + " | ".join(cells))
    if agree:
        for r in results:
            if r.get("max_fp32_margin_flipped") is not None:
                print(f"  {r['variant']}: queries whose top-1 changed were near-ties in fp32 "
                      f"(top-1 minus new top-1 score <= {r['max_fp32_margin_flipped']:.4f})")
        dec = next((r["decided_fraction"] for r in results if "decided_fraction" in r), None)
        if dec is not None:
            print(f"  top1=decid: top-1 agreement on the {100 * dec:.0f}% of queries whose fp32 top-1 leads "
                  f"its runner-up by >= {TIE_MARGIN} (the rest are near-ties that rounding can flip)")
        print(f"  agreement vs ORT fp32 over {next(r['top1_queries'] for r in results if 'top1_queries' in r)} retrieval queries on "
              + ", ".join(f"{s.name} ({len(idx)} frames)" for s, idx, _ in agree))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": base.model_name, "what": what, "input": [args.height, args.width],
                                               "results": results}, indent=2))
    return 0
