"""`megaloc-ros bench map`: place-map add/query latency, memory per keyframe and recall@1 of
the compressed index against exact search, at several map sizes in one run.

The data are synthetic (1M real 8448-D descriptors do not exist here, and would be 34 GB).
They are made to look like a robot's keyframes, not like random vectors:

* a trajectory: keyframe t has a place code p_t, an AR(1) walk along the chunk
  (p_t = rho p_{t-1} + sqrt(1 - rho^2) eta_t, rho = ``--rho``), so consecutive keyframes are
  similar and the exact nearest neighbour has close competitors;
* an observation: x_t = normalise(s * (p_t + sigma n_t)), n_t fresh noise, and
  s_k = (1 + k/knee)^-alpha a spectrum with a flat head of ~``--knee`` directions and a
  power-law tail (defaults knee 100, alpha 1: the top 1024 of 8448 directions hold ~92% of the
  energy, so PCA truncation costs some ranking). With these defaults a revisit scores ~0.76
  with its keyframe, ~0.70 with the neighbouring keyframe and ~0.2 with unrelated places (as
  real place descriptors do). A pure power law (knee 1) concentrates the energy in a few
  directions, so that unrelated places look alike and "exact top-1" becomes a coin toss;
* queries are revisits: a keyframe's place code, moved slightly (``--query-rho``), observed
  with fresh noise (targets drawn from 10 random chunks per size). Ground truth is the exact top-1 inner product over the whole map, by brute
  force, streamed chunk by chunk (chunks are regenerated from their seeds, never all held).

The vectors are generated in their principal basis; every figure here is unchanged by a
rotation of the descriptor space, because the index learns its PCA from the data.

Rows: ``flat`` = exact search (where it fits in memory), then the compressed index. The
largest two sizes are one map measured as it grows (trained at the smaller of them).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from megaloc_ros.mapping.place_map import MapSettings
from megaloc_ros.types import SECOND_NS, Keyframe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="comma-separated map sizes (multiples of --chunk; default: %(default)s)")
    p.add_argument("--dim", type=int, default=8448, help="descriptor size (MegaLoc: 8448)")
    p.add_argument("--map-index", dest="index", default="ivfpq", choices=["ivfpq", "ivfsq8", "hnsw", "sq8"],
                   help="compressed index kind under test (map.index; default: %(default)s)")
    d = MapSettings()  # the bench measures the map's own defaults unless told otherwise
    p.add_argument("--pca-dim", type=int, default=d.pca_dim)
    p.add_argument("--pq-m", type=int, default=d.pq_m)
    p.add_argument("--pq-bits", type=int, default=d.pq_bits, choices=[4, 8],
                   help="4: fast-scan PQ, 8: classic PQ (default: %(default)s)")
    p.add_argument("--nlist", type=int, default=d.nlist, help="IVF lists (0: 4*sqrt(training keyframes))")
    p.add_argument("--nprobe", default=str(d.nprobe),
                   help="IVF lists visited per query; a comma list measures each (default: %(default)s)")
    p.add_argument("--refine-factor", type=int, default=d.refine_factor)
    p.add_argument("--whiten", action="store_true")
    p.add_argument("--train-max", type=int, default=100000,
                   help="train the compressed index on at most this many keyframes")
    p.add_argument("--queries", type=int, default=300, help="revisit queries per size")
    p.add_argument("--flat-queries", type=int, default=20, help="queries timed on exact search")
    p.add_argument("--flat-max-gb", type=float, default=4.0, help="largest exact map to time")
    p.add_argument("--adds", type=int, default=200, help="single adds timed per size")
    p.add_argument("--k", type=int, default=5, help="neighbours per query (as the detector's top_k)")
    p.add_argument("--chunk", type=int, default=10000)
    p.add_argument("--alpha", type=float, default=1.0, help="spectrum tail exponent")
    p.add_argument("--knee", type=float, default=100.0, help="spectrum head width (directions)")
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--query-rho", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this JSON file")


class Stream:
    """Deterministic synthetic keyframe descriptors, generated chunk by chunk from seeds."""

    def __init__(self, dim, chunk, alpha, knee, rho, sigma, query_rho, seed):
        self.dim, self.chunk, self.rho, self.sigma, self.qrho, self.seed = dim, chunk, rho, sigma, query_rho, seed
        s = (1.0 + np.arange(dim, dtype=np.float64) / knee) ** -alpha
        self.scale = (s / np.linalg.norm(s)).astype(np.float32)

    def places(self, c: int) -> np.ndarray:
        """Place codes of chunk ``c`` (an AR(1) trajectory segment)."""
        rng = np.random.default_rng([self.seed, c, 0])
        p = rng.standard_normal((self.chunk, self.dim), dtype=np.float32)
        a, b = np.float32(self.rho), np.float32(np.sqrt(1 - self.rho ** 2))
        p[1:] *= b
        for t in range(1, self.chunk):
            p[t] += a * p[t - 1]
        return p

    def observe(self, places: np.ndarray, rng) -> np.ndarray:
        x = places + np.float32(self.sigma) * rng.standard_normal(places.shape, dtype=np.float32)
        x *= self.scale
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def keyframes(self, c: int) -> np.ndarray:
        return self.observe(self.places(c), np.random.default_rng([self.seed, c, 1]))

    def revisits(self, targets: np.ndarray, tag: int) -> np.ndarray:
        """Queries re-observing the keyframes ``targets`` (global indices)."""
        out = np.zeros((len(targets), self.dim), np.float32)
        for c in np.unique(targets // self.chunk):
            sel = np.nonzero(targets // self.chunk == c)[0]
            p = self.places(int(c))[targets[sel] % self.chunk]
            rng = np.random.default_rng([self.seed, int(c), 2, tag])
            drift = rng.standard_normal(p.shape, dtype=np.float32)
            p = np.float32(self.qrho) * p + np.float32(np.sqrt(1 - self.qrho ** 2)) * drift
            out[sel] = self.observe(p, rng)
        return out


def _pct(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.median(a)), float(np.percentile(a, 99))


def _kfs(start: int, n: int) -> list[Keyframe]:
    return [Keyframe(i, i * SECOND_NS // 2, 0, "camera") for i in range(start, start + n)]


def main(args) -> int:
    import faiss
    from megaloc_ros.mapping.place_map import PlaceMap
    sizes = sorted(int(s) for s in str(args.sizes).split(","))
    if any(s % args.chunk or s <= 0 for s in sizes):
        raise SystemExit(f"bench map: sizes must be positive multiples of --chunk={args.chunk}")
    st = Stream(args.dim, args.chunk, args.alpha, args.knee, args.rho, args.sigma, args.query_rho, args.seed)
    rng = np.random.default_rng(args.seed + 7)
    def targets(n):  # revisited keyframes, from at most 10 chunks (each is regenerated once)
        chunks = rng.choice(n // args.chunk, min(10, n // args.chunk), replace=False)
        picks = rng.choice(len(chunks) * args.chunk, args.queries, replace=False)
        return np.sort(chunks[picks // args.chunk] * args.chunk + picks % args.chunk)

    revisited = {n: targets(n) for n in sizes}
    queries = {n: st.revisits(revisited[n], i) for i, n in enumerate(sizes)}
    best = {n: np.full(args.queries, -np.inf, np.float32) for n in sizes}
    best_id = {n: np.full(args.queries, -1, np.int64) for n in sizes}
    nprobes = [int(v) for v in str(args.nprobe).split(",")]
    opts = dict(pca_dim=args.pca_dim, pq_m=args.pq_m, pq_bits=args.pq_bits, nlist=args.nlist, nprobe=nprobes[0],
                refine_factor=args.refine_factor, whiten=args.whiten, train_size=1 << 62)
    # maps: sizes up to --train-max get their own map trained on all of them; larger sizes
    # share one map trained at --train-max keyframes
    trained_at = {n: min(n, args.train_max) for n in sizes}
    maps, owner = {}, {}
    for n in sizes:
        key = trained_at[n]
        if key not in maps:
            maps[key] = PlaceMap(args.dim, "synthetic", MapSettings(index=args.index, **opts))
        owner[n] = key
    print(f"bench map: {args.dim}-D synthetic revisit descriptors (see `--help`/module doc), "
          f"index {args.index} pca_dim={args.pca_dim} pq_m={args.pq_m} pq_bits={args.pq_bits} nprobe={args.nprobe} "
          f"refine_factor={args.refine_factor} whiten={args.whiten}; "
          f"{args.queries} queries, k={args.k}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads",
          flush=True)
    rows, total, t_start = [], max(sizes), time.perf_counter()
    pending_adds: dict[int, int] = {}   # map key -> rows of the next chunk to add one by one
    n_chunks = total // args.chunk + 1  # one extra chunk supplies the last single adds
    for c in range(n_chunks):
        lo = c * args.chunk
        x = st.keyframes(c)
        for n in sizes:  # exact ground truth, streamed
            if lo < n:
                s = queries[n] @ x.T
                j = np.argmax(s, axis=1)
                v = s[np.arange(len(j)), j]
                better = v > best[n]
                best[n][better], best_id[n][better] = v[better], lo + j[better]
        kfs = _kfs(lo, args.chunk)
        for key, m in maps.items():
            if len(m) >= max(s for s in sizes if owner[s] == key) + args.adds:
                continue
            single = pending_adds.pop(key, 0)
            add_ms = []
            for i in range(single):
                t0 = time.perf_counter()
                m.add(kfs[i], x[i])
                add_ms.append((time.perf_counter() - t0) * 1e3)
            if add_ms:
                for r in rows:
                    if r["map"] == key and r["kind"] != "flat" and r["add_ms_p50"] is None:
                        r["add_ms_p50"], r["add_ms_p99"] = _pct(add_ms)
            rest = slice(single, args.chunk)
            if len(m) < max(s for s in sizes if owner[s] == key):
                m.add_many(kfs[rest], x[rest])
        del x
        for n in sizes:
            if lo + args.chunk != n:
                continue
            m = maps[owner[n]]
            if not m.trained:
                mem = m.memory_bytes()
                if mem["index"] <= args.flat_max_gb * 2 ** 30:
                    lat = []
                    for q in queries[n][: args.flat_queries]:
                        t0 = time.perf_counter()
                        m.search(q, args.k)
                        lat.append((time.perf_counter() - t0) * 1e3)
                    rows.append(_row(n, "flat", owner[n], lat, 1.0, mem, None))
                    print(f"  {n} keyframes: exact query p50 {rows[-1]['query_ms_p50']:.1f} ms", flush=True)
                t0 = time.perf_counter()
                m.train_now()
                print(f"  trained {args.index} on {len(m)} keyframes in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            mem = m.memory_bytes()
            near = float(np.mean(np.abs(best_id[n] - revisited[n]) <= 2))
            print(f"  {n} keyframes: the exact top-1 is the revisited keyframe (+-2) for {near:.3f} "
                  "of the queries", flush=True)
            for nprobe in nprobes:
                if args.index in ("ivfpq", "ivfsq8"):
                    m.set_search_options(nprobe=nprobe)
                lat, hit = [], 0
                for q, gt in zip(queries[n], best_id[n]):
                    t0 = time.perf_counter()
                    res = m.search(q, args.k)
                    lat.append((time.perf_counter() - t0) * 1e3)
                    hit += bool(res) and res[0][0].id == gt
                kind = args.index + (f"/np{nprobe}" if len(nprobes) > 1 else "")
                row = _row(n, kind, owner[n], lat, hit / len(lat), mem, None)
                row["trained_on"], row["nprobe"], row["exact_top1_is_revisit"] = owner[n], nprobe, near
                rows.append(row)
                print(f"  {n} keyframes: {kind} query p50 {row['query_ms_p50']:.2f} ms, recall@1 "
                      f"{row['recall_at_1']:.3f}, {row['bytes_per_kf']:.0f} B/kf in all", flush=True)
            if args.index in ("ivfpq", "ivfsq8"):
                m.set_search_options(nprobe=nprobes[0])
            pending_adds[owner[n]] = args.adds
            print(f"  {n} keyframes measured ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
    _print(rows, sizes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"func": None}, "rows": rows}, f, indent=1, default=str)
    return 0


def _row(n, kind, key, lat, recall, mem, add):
    p50, p99 = _pct(lat)
    return {"keyframes": n, "kind": kind, "map": key, "query_ms_p50": p50, "query_ms_p99": p99,
            "recall_at_1": recall, "index_bytes_per_kf": mem["index"] / n,
            "metadata_bytes_per_kf": mem["metadata"] / n, "bytes_per_kf": (mem["index"] + mem["metadata"]) / n,
            "add_ms_p50": add, "add_ms_p99": add}


def _print(rows, sizes) -> None:
    cols = ["keyframes", "index", "query_ms_p50", "query_ms_p99", "add_ms_p50", "add_ms_p99",
            "recall@1", "B/kf_index", "B/kf_meta", "B/kf_total"]
    print(" ".join(f"{c:>12}" for c in cols))
    for r in rows:
        def f(v, fmt):
            return "n/a" if v is None else format(v, fmt)
        vals = [str(r["keyframes"]), r["kind"], f(r["query_ms_p50"], ".2f"), f(r["query_ms_p99"], ".2f"),
                f(r["add_ms_p50"], ".3f"), f(r["add_ms_p99"], ".3f"),
                "exact" if r["kind"] == "flat" else f(r["recall_at_1"], ".3f"),
                f(r["index_bytes_per_kf"], ".0f"), f(r["metadata_bytes_per_kf"], ".0f"),
                f(r["bytes_per_kf"], ".0f")]
        print(" ".join(f"{v:>12}" for v in vals))
    print("recall@1: share of revisit queries whose top-1 is the exact inner-product top-1; "
          "B/kf: bytes per keyframe (index: codes, ids, re-rank codes, centroids, PCA matrix; "
          "metadata: allocated columns; total: both). "
          "Flat rows time exact search and are the recall reference.")
