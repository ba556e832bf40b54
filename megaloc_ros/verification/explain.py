"""Why a loop was accepted or rejected, as a picture (for RViz and the evaluation report).

``explain_details(verifier, candidate)`` recomputes, for one candidate, what the verifier's
decision rested on, from what the verifier stored for the two keyframes (no image needed):

  * SegVLAD: the cosine similarity of every query SuperSegment descriptor to every one of the
    match's (the product the verifier's vote starts from, restricted to this candidate as
    ``Verifier._decide`` restricts it), hence per query SuperSegment its best similarity, its
    best partner on the match side and its vote (mean of its ``vote_top_k`` best similarities,
    clipped at 0; the mean of the votes is the candidate's SegVLAD score,
    ``decision.segvlad_scores``);
  * geometry: the verifier's own check (``Verifier.check_geometry``: the tentative matches and
    the a-contrario test on them, inlier count, -log10 NFA, the epipolar distance it settled on,
    and its inlier mask), the inlier pairs as keypoint pairs in each image's pixel frame (as
    detected, distortion not undone: they are drawn on the images).

It is only called when someone wants a picture, so recomputing is fine; the counts it finds
are checked against the verdict's (``Explanation.inliers`` against ``VerifiedLoop.inliers``)
by the tests, and a picture whose drawn inliers differ from the verifier's count says so.

The verifier keeps SuperSegment descriptors, not masks. ``render_explanation`` computes the
masks from the images with the verifier's own functions (``segments.segment_image``,
``segvlad.delaunay_adjacency`` / ``supersegments``, the same ``order`` and the same "keep the
``max_supersegments`` largest" rule), so row ``r`` of the stored descriptors is the SuperSegment
centred on the ``r``-th kept segment. The verifier ranks segments by their area on the backbone's
patch grid, which it does not store; here they are ranked by pixel area, which keeps the same
set whenever an image has at most ``max_supersegments`` segments (SLIC's default 48 targets
that many) and nearly the same set otherwise.

Picture layout (``render_explanation``; RGB uint8, width ``2 * panel_w + GAP``, panels
``height`` px high, default 300)::

    +-----------------------------+---+-----------------------------+
    | QUERY image                 |   | MATCH image                 |
    |  tint: each segment that    |   |  outlined, numbered 1..5:   |
    |  centres a stored Super-    |   |  the centre segment of the  |
    |  Segment, by that Super-    |   |  best-matching SuperSegment |
    |  Segment's vote;            |   |  (partner) of each numbered |
    |  outlined, numbered 1..5:   |   |  query one, same colour;    |
    |  the centre segments of the |   |  "1,3": partner of both     |
    |  TOP_K query SuperSegments  |   |                             |
    |  with the best similarity;  |   |                             |
    |  thin outline: the whole    |   |                             |
    |  extent of number 1         |   |                             |
    +----- cyan: geometric inliers, a dot on each keypoint, lines joining the pairs ----+
    | band: ACCEPTED (green box) / REJECTED (red box), query -> match keyframe ids,     |
    |       stamps (s) and retrieval rank                                               |
    |       the verdict's reason (``VerifiedLoop.reason``, wrapped)                      |
    |       global score | SegVLAD score | inliers / matches, distance, -log10 NFA      |
    |       colour bar of the similarity scale with its two ends                       |
    +-----------------------------------------------------------------------------------+

A SuperSegment spans its centre segment's neighbours within ``order`` hops (at the default 3,
much of the image), so it is drawn by its centre segment; number 1 also gets its whole extent.
Colours: similarities on OpenCV's TURBO map (blue low, green middle, dark red high) stretched
over this candidate's own range (``similarity_scale``: the ends are printed at the colour bar,
so no colour is read as an absolute score); tint at 45% opacity; outlines 2 px in the colour of
the SuperSegment's best similarity over a black edge; inliers cyan (every inlier a dot, at most
``MAX_LINES`` evenly chosen pairs joined by 1 px lines, the band says how many). Panel labels
(top left, white on black): "query kf <id> t=<stamp>s" / "match kf <id> t=<stamp>s".
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

import cv2
import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.types import SECOND_NS, Candidate, VerifiedLoop
from megaloc_ros.verification import decision, segments, segvlad

TOP_K = 5                   # query SuperSegments outlined (best similarity first)
GAP = 8                     # pixels between the two panels
PANEL_HEIGHT = 300          # default height of each image panel
BAND_BG = (32, 32, 32)
TEXT = (235, 235, 235)
ACCEPT = (40, 170, 60)
REJECT = (200, 40, 40)
INLIER = (0, 230, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX
HEAT_ALPHA = 0.45           # opacity of the similarity tint
MAX_LINES = 80              # inlier lines drawn at most (evenly chosen; every inlier gets its dots)


@dataclass
class Explanation:
    """What one candidate's verdict rested on (``explain_details``)."""
    query_id: int
    match_id: int
    # SegVLAD (None when either keyframe has no SuperSegment descriptors yet)
    similarity: Optional[np.ndarray] = None    # float32 [Sq, Sm] cosine, query x match SuperSegments
    best: Optional[np.ndarray] = None          # float32 [Sq] best similarity of each query SuperSegment
    partner: Optional[np.ndarray] = None       # int [Sq] match SuperSegment giving it
    votes: Optional[np.ndarray] = None         # float32 [Sq] mean top-k similarity (>= 0)
    segvlad_score: Optional[float] = None      # mean of votes == segvlad.vote(...) for this candidate
    segvlad_note: str = ""                     # why there is no SegVLAD part
    # geometry, in the pixel frame of the image each keyframe was added with
    query_size: tuple[int, int] = (0, 0)       # (w, h)
    match_size: tuple[int, int] = (0, 0)
    matches: int = 0                           # tentative matches
    verdict_inliers: int = 0                   # what the a-contrario check counts (the verdict's)
    significance: float = 0.0                  # its -log10 NFA
    threshold_px: float = 0.0                  # the epipolar distance it settled on
    inlier_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 2), np.float32))  # [I, (q, m), (x, y)]
    # how the verifier segments images (to draw the masks)
    segment_params: Any = None                 # segments.SegmentParams
    order: int = 3
    max_supersegments: int = 48
    vote_top_k: int = 5
    sam: Any = None                            # the verifier's SamSegmenter, if it uses one

    @property
    def inliers(self) -> int:
        return len(self.inlier_pairs)


# ----------------------------------------------------------------------------- details

def explain_details(verifier, candidate: Candidate) -> Explanation:
    """Recompute, for ``candidate``, the per-SuperSegment similarities and the inlier keypoint
    pairs from what ``verifier`` stored (see the module docstring). MegalocError when either
    keyframe was never added to it."""
    p = verifier.params
    with verifier._lock:
        q = verifier._entries.get(candidate.query.id)
        m = verifier._entries.get(candidate.match.id)
    for kid, e in ((candidate.query.id, q), (candidate.match.id, m)):
        if e is None:
            raise MegalocError(f"keyframe {kid} was never added to the verifier: nothing to explain")
    ex = Explanation(candidate.query.id, candidate.match.id, query_size=tuple(q.image_size),
                     match_size=tuple(m.image_size), segment_params=p.segments, order=p.order,
                     max_supersegments=p.max_supersegments, vote_top_k=p.vote_top_k,
                     sam=getattr(verifier, "_sam", None))
    if q.supersegments is not None and m.supersegments is not None and len(q.supersegments) \
            and len(m.supersegments):
        qs = q.supersegments.astype(np.float32)
        ms = m.supersegments.astype(np.float32)
        sim = qs @ ms.T
        k = min(p.vote_top_k, sim.shape[1])
        top = -np.sort(-sim, axis=1)[:, :k]
        ex.similarity = sim
        ex.best = sim.max(axis=1)
        ex.partner = sim.argmax(axis=1)
        ex.votes = np.maximum(top, 0).mean(axis=1).astype(np.float32)
        ex.segvlad_score = float(decision.segvlad_scores(qs, [ms], p.vote_top_k)[0])
    elif q.pending_patches is not None or m.pending_patches is not None or not verifier.has_vocabulary:
        ex.segvlad_note = "no SegVLAD yet: the vocabulary is fitted after the first keyframes"
    else:
        ex.segvlad_note = "no SegVLAD: a keyframe without patch features"
    g = verifier.check_geometry(q, m)
    pairs, chk = g.pairs, g.check
    ex.matches = len(pairs)
    ex.verdict_inliers = int(chk.inliers)
    ex.significance = float(chk.significance.score)
    ex.threshold_px = float(chk.significance.threshold_px)
    sel = pairs[chk.inlier_mask] if chk.inlier_mask is not None else pairs[:0]
    if len(sel):
        ex.inlier_pairs = np.stack([q.local.keypoints[sel[:, 0]], m.local.keypoints[sel[:, 1]]],
                                   axis=1).astype(np.float32)
    return ex


# ----------------------------------------------------------------------------- masks

def supersegment_masks(image_rgb: np.ndarray, details: Explanation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels int32 [h, w] at segmentation resolution, kept SuperSegments bool [S_kept, S]
    (row r: the segments forming the SuperSegment stored in row r), centres int [S_kept] (the
    segment row r is centred on)); see the module docstring for the ranking caveat."""
    params = details.segment_params or segments.SegmentParams()
    labels = segments.segment_image(image_rgb, params, details.sam)
    adj = segvlad.delaunay_adjacency(segvlad.segment_centroids(labels))
    ss = segvlad.supersegments(adj, details.order)
    area = np.bincount(labels.ravel(), minlength=ss.shape[0])
    keep = np.sort(np.argsort(-area, kind="stable")[: details.max_supersegments])
    return labels, ss[keep], keep


# ----------------------------------------------------------------------------- picture

def similarity_scale(details: Explanation) -> tuple[float, float]:
    """(lo, hi) of the colour scale: the range of this candidate's SuperSegment similarities
    (votes and best similarities), at least 0.1 wide; (0, 1) without SegVLAD."""
    if details.best is None or not len(details.best):
        return 0.0, 1.0
    v = np.concatenate([details.best, details.votes]).astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 0.1:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - 0.05, mid + 0.05
    return lo, hi


def _turbo(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """RGB uint8 [..., 3] of ``values`` on the TURBO map over [lo, hi]."""
    idx = np.clip(np.round((np.asarray(values, np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    flat = cv2.applyColorMap(idx.reshape(-1, 1), cv2.COLORMAP_TURBO)[:, 0, ::-1]
    return flat.reshape(idx.shape + (3,))


def _fit(rgb: np.ndarray, height: int) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    h, w = rgb.shape[:2]
    width = max(1, round(w * height / h))
    interp = cv2.INTER_AREA if height < h else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb[:, :, :3].astype(np.uint8), (width, height), interpolation=interp))


def _rgb8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


def _label(img: np.ndarray, text: str, org=(4, 4), scale: float = 0.45) -> None:
    (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
    h, w = img.shape[:2]
    x = int(np.clip(org[0], 0, max(0, w - tw - 6)))
    y = int(np.clip(org[1], 0, max(0, h - th - base - 4)))
    cv2.rectangle(img, (x, y), (x + tw + 6, y + th + base + 4), (0, 0, 0), -1)
    cv2.putText(img, text, (x + 3, y + th + 2), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _outline(img: np.ndarray, mask_small: np.ndarray, colour, number: Optional[str] = None,
             thickness: int = 2) -> None:
    h, w = img.shape[:2]
    m = cv2.resize(mask_small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.drawContours(img, contours, -1, colour, thickness, cv2.LINE_AA)
    if number is not None and m.any():
        ys, xs = np.nonzero(m)
        # the mask pixel nearest its centroid, so the number sits inside the region
        cx, cy = xs.mean(), ys.mean()
        i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        _label(img, number, (int(xs[i]) - 8, int(ys[i]) - 9), 0.5)


def _heat(img: np.ndarray, labels: np.ndarray, centres: np.ndarray, values: np.ndarray,
          lo: float, hi: float, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """Tint each segment that centres a kept SuperSegment by that SuperSegment's value."""
    lut = np.full(int(labels.max()) + 1, np.nan)
    n = min(len(centres), len(values))
    lut[centres[:n]] = values[:n]
    h, w = img.shape[:2]
    val = cv2.resize(lut[labels].astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    on = np.isfinite(val)
    colours = _turbo(np.nan_to_num(val), lo, hi)
    out = img.astype(np.float32)
    out[on] = (1 - alpha) * out[on] + alpha * colours[on].astype(np.float32)
    return out.astype(np.uint8)


def _stamp(ns: int) -> str:
    return f"t={ns / SECOND_NS:.3f}s"


def render_explanation(query_rgb: np.ndarray, match_rgb: np.ndarray, loop: VerifiedLoop,
                       details: Explanation, height: int = PANEL_HEIGHT) -> np.ndarray:
    """The picture of one verdict (layout and colours: module docstring) -> RGB uint8 [H, W, 3].

    ``query_rgb`` / ``match_rgb``: the keyframes' images, at any scale (keypoints are scaled
    from the size the verifier saw them at; segmentation runs on the images given, so pass them
    at least at the segmentation size, ``segments.max_side``)."""
    query_rgb, match_rgb = _rgb8(query_rgb), _rgb8(match_rgb)
    q_img, m_img = _fit(query_rgb, height), _fit(match_rgb, height)
    cand = loop.candidate
    lo, hi = similarity_scale(details)
    if details.best is not None:
        q_labels, q_ss, q_centres = supersegment_masks(query_rgb, details)
        m_labels, _, m_centres = supersegment_masks(match_rgb, details)
        q_img = _heat(q_img, q_labels, q_centres, details.votes, lo, hi)
        order = np.argsort(-details.best, kind="stable")[:TOP_K]
        partners: dict[int, list[int]] = {}  # match row -> the numbers it partners
        for n, r in reversed(list(enumerate(order, 1))):  # number 1 drawn last, on top
            r = int(r)
            c = tuple(int(x) for x in _turbo(details.best[r], lo, hi))
            if n == 1 and r < len(q_ss):  # the best SuperSegment's whole extent, thin
                _outline(q_img, q_ss[r][q_labels], c, None, 1)
            if r < len(q_centres):
                _outline(q_img, q_labels == q_centres[r], c, str(n))
            partners.setdefault(int(details.partner[r]), []).insert(0, n)
        for pr, numbers in sorted(partners.items(), key=lambda x: -x[1][0]):
            if pr < len(m_centres):
                c = tuple(int(x) for x in _turbo(details.best[int(order[numbers[0] - 1])], lo, hi))
                _outline(m_img, m_labels == m_centres[pr], c, ",".join(map(str, numbers)))
    _label(q_img, f"query kf {cand.query.id} {_stamp(cand.query.stamp_ns)}")
    _label(m_img, f"match kf {cand.match.id} {_stamp(cand.match.stamp_ns)}")
    top = np.zeros((height, q_img.shape[1] + GAP + m_img.shape[1], 3), np.uint8)
    top[:, :] = BAND_BG
    top[:, :q_img.shape[1]] = q_img
    x0 = q_img.shape[1] + GAP
    top[:, x0:] = m_img
    drawn = 0
    if details.inliers:
        sq = np.array([q_img.shape[1] / max(details.query_size[0], 1), height / max(details.query_size[1], 1)])
        sm = np.array([m_img.shape[1] / max(details.match_size[0], 1), height / max(details.match_size[1], 1)])
        a = details.inlier_pairs[:, 0] * sq
        b = details.inlier_pairs[:, 1] * sm + np.array([x0, 0])
        for pa, pb in zip(a, b):
            cv2.circle(top, tuple(int(round(v)) for v in pa), 2, INLIER, -1, cv2.LINE_AA)
            cv2.circle(top, tuple(int(round(v)) for v in pb), 2, INLIER, -1, cv2.LINE_AA)
        lines = np.unique(np.linspace(0, len(a) - 1, min(len(a), MAX_LINES)).round().astype(int))
        for i in lines:
            cv2.line(top, tuple(int(round(v)) for v in a[i]), tuple(int(round(v)) for v in b[i]), INLIER, 1,
                     cv2.LINE_AA)
        drawn = len(lines)
    return np.concatenate([top, _band(top.shape[1], loop, details, lo, hi, drawn)], axis=0)


def _band(width: int, loop: VerifiedLoop, details: Explanation, lo: float, hi: float, lines: int) -> np.ndarray:
    scale, lh = 0.5, 20
    chars = max(20, int(width / (cv2.getTextSize("x", FONT, scale, 1)[0][0] + 0.5)))
    cand = loop.candidate
    verdict = "ACCEPTED" if loop.accepted else "REJECTED"
    reason_lines = textwrap.wrap(loop.reason or "(no reason given)", chars - 2)[:4]
    sv = (f"SegVLAD {details.segvlad_score:.3f} (mean of {len(details.votes)} SuperSegment votes, "
          f"top-{details.vote_top_k})" if details.segvlad_score is not None else details.segvlad_note)
    geo = (f"{details.inliers} inliers of {details.matches} matches within {details.threshold_px:.1f} px, "
           f"-log10 NFA {details.significance:.1f}")
    if details.inliers != details.verdict_inliers:
        geo += f" (drawn: refitted; the verifier counted {details.verdict_inliers})"
    facts_lines = textwrap.wrap(f"global {cand.score:.3f} | {sv} | {geo}", chars - 2)[:3]
    n_lines = 1 + len(reason_lines) + len(facts_lines)
    band = np.zeros((n_lines * lh + 34, width, 3), np.uint8)
    band[:] = BAND_BG
    y = lh - 4
    (tw, th), _ = cv2.getTextSize(verdict, FONT, 0.6, 2)
    cv2.rectangle(band, (4, y - th - 4), (12 + tw, y + 5), ACCEPT if loop.accepted else REJECT, -1)
    cv2.putText(band, verdict, (8, y), FONT, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(band, f"query kf {cand.query.id} ({_stamp(cand.query.stamp_ns)}) -> match kf {cand.match.id} "
                f"({_stamp(cand.match.stamp_ns)}), rank {cand.rank}", (20 + tw, y), FONT, scale, TEXT, 1,
                cv2.LINE_AA)
    for line in reason_lines + facts_lines:
        y += lh
        cv2.putText(band, line, (8, y), FONT, scale, TEXT, 1, cv2.LINE_AA)
    y += 12
    x = 8
    lo_t, hi_t = f"{lo:.2f}", f"{hi:.2f}"
    x_bar = x + cv2.getTextSize(lo_t, FONT, 0.4, 1)[0][0] + 6
    bw = min(200, width // 4)
    if details.best is not None:
        cv2.putText(band, lo_t, (x, y + 10), FONT, 0.4, TEXT, 1, cv2.LINE_AA)
        band[y:y + 10, x_bar:x_bar + bw] = _turbo(np.linspace(lo, hi, bw), lo, hi)[None].repeat(10, axis=0)
        legend = f"{hi_t} SuperSegment similarity (tint: vote; 1-{min(TOP_K, len(details.best))}: best, and partners)"
        x_txt = x_bar + bw + 6
    else:
        legend, x_txt = "no SuperSegment similarities", x
    legend += f"; cyan: inliers ({lines} of {details.inliers} as lines)"
    while len(legend) > 12 and cv2.getTextSize(legend, FONT, 0.4, 1)[0][0] > width - x_txt - 4:
        legend = legend[:-4] + "..."
    cv2.putText(band, legend, (x_txt, y + 10), FONT, 0.4, TEXT, 1, cv2.LINE_AA)
    return band
