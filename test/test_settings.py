"""One source of truth per setting: the settings dataclasses, ``--set`` parsing, the ROS
parameter specs and config/loop_closure.yaml derived from them, one name per setting."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from megaloc_ros import settings as S
from megaloc_ros.errors import MegalocError
from megaloc_ros.mapping.detector import DetectorParams
from megaloc_ros.mapping.place_map import MapSettings
from megaloc_ros.ros import params as P
from megaloc_ros.verification.segments import SegmentParams
from megaloc_ros.verification.verifier import VerifierParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"encoder": S.EncoderSettings, "map": MapSettings, "detector": DetectorParams,
            "verifier": VerifierParams}


def test_parse_set_types_values_as_yaml():
    got = S.parse_set(["detector.top_k=3", "detector.similarity_threshold=0.8", "x.flag=true",
                       "verifier.ratio=1e-1", "camera_matrix=[500, 500.5, 320, 240, 640, 480]",
                       "encoder.model_path=/m/a b.onnx", "map_path=", "odom_topic='0.5'", " y.z = 2 "])
    assert got == {"detector.top_k": 3, "detector.similarity_threshold": 0.8, "x.flag": True,
                   "verifier.ratio": 0.1, "camera_matrix": [500, 500.5, 320, 240, 640, 480],
                   "encoder.model_path": "/m/a b.onnx", "map_path": "", "odom_topic": "0.5", "y.z": 2}
    assert type(got["detector.top_k"]) is int
    assert S.parse_set(["detector.top_k:=4"], sep=":=") == {"detector.top_k": 4}
    assert S.parse_set(None) == {}


@pytest.mark.parametrize("item", ["detector.top_k", "=3", "detector top_k=3", "detector..top_k=1",
                                  "a=[1, 2", "a={b: 1}"])
def test_parse_set_refuses_malformed_items(item):
    with pytest.raises(MegalocError, match=re.escape(repr(item))):
        S.parse_set([item])


@pytest.mark.parametrize("name,value,msg", [
    ("detector.max_similarity_to_last", -3, r"detector.max_similarity_to_last must be in \[0.0, 1.01\]; got -3"),
    ("detector.top_k", 0, "detector.top_k must be >= 1"),
    ("detector.similarity_threshold", 1.5, "detector.similarity_threshold must be in"),
    ("verifier.segments.n_segments", 0, "verifier.segments.n_segments must be in"),
    ("verifier.segments.method", "watershed", "verifier.segments.method must be one of slic"),
    ("verifier.min_segvlad_score", 2.0, "verifier.min_segvlad_score must be in"),
    ("verifier.vocab_size", 1, "verifier.vocab_size must be in"),
    ("map.index", "lsh", "map.index must be one of flat, ivfpq"),
    ("map.pq_bits", 6, "map.pq_bits must be one of 4, 8"),
    ("encoder.device", "tpu", "encoder.device must be one of auto, cpu, cuda"),
    ("detector.top_k", 2.5, "detector.top_k must be of type int"),
    ("verifier.mutual", 1, "verifier.mutual must be of type bool"),
    ("encoder.model_path", 3, "encoder.model_path must be of type str"),
    ("detector.top_kk", 3, "unknown parameter detector.top_kk"),
    ("verifier.ratio.x", 3, "unknown parameter verifier.ratio.x"),
])
def test_from_flat_refuses_bad_values_naming_the_parameter(name, value, msg):
    prefix = name.split(".")[0]
    with pytest.raises(MegalocError, match=msg):
        S.from_flat(SECTIONS[prefix], prefix, {name: value})


def test_constructors_check_ranges_too():
    with pytest.raises(MegalocError, match="detector.max_similarity_to_last"):
        DetectorParams(max_similarity_to_last=-3)
    with pytest.raises(MegalocError, match="verifier.segments.n_segments"):
        SegmentParams(n_segments=0)
    with pytest.raises(MegalocError, match="verifier.min_segvlad_score"):
        VerifierParams(min_segvlad_score=2.0)
    with pytest.raises(MegalocError, match="map.pq_m=100 must divide map.pca_dim=1024"):
        MapSettings(index="ivfpq", pq_m=100)
    MapSettings(pq_m=100)  # only the ivfpq index uses pq_m


def test_from_flat_coerces_and_flatten_inverts_it():
    v = S.from_flat(VerifierParams, "verifier", {"verifier.ratio": 1, "verifier.segments.method": "felzenszwalb",
                                                 "detector.top_k": 9, "map_path": "x"})
    assert v.ratio == 1.0 and type(v.ratio) is float and v.segments.method == "felzenszwalb"
    assert v.segments.max_side == SegmentParams().max_side  # the rest keeps its defaults
    flat = S.flatten(v, "verifier")
    assert flat["verifier.segments.method"] == "felzenszwalb" and "verifier.segments" not in flat
    assert S.from_flat(VerifierParams, "verifier", flat) == v
    d = S.from_flat(DetectorParams, "detector", S.flatten(DetectorParams(top_k=7), "detector"))
    assert d == DetectorParams(top_k=7)
    node = S.from_flat(P.VerifierNodeSettings, "", {"camera_matrix": [1, 2, 3, 4, 5, 6], "verifier.order": 2})
    assert node.camera_matrix == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_every_setting_has_help_and_one_name():
    specs = P.all_node_specs()
    for node, node_specs in specs.items():
        names = [s.name for s in node_specs]
        assert len(names) == len(set(names)), node
        for s in node_specs:
            assert len(s.description) > 10, f"{s.name} has no help text"
    for cls in list(SECTIONS.values()) + [SegmentParams, P.LoopClosureNodeSettings, P.VerifierNodeSettings]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    # a setting is declared once: no leaf is a copy of another section's field under a new name
    lc = {s.name for s in specs[P.LOOP_CLOSURE_NODE]}
    vn = {s.name for s in specs[P.VERIFIER_NODE]}
    assert {"encoder.model_path", "encoder.device", "map.index", "verifier.segments.method"} <= lc | vn
    seg = {f.name for f in dataclasses.fields(SegmentParams)}
    assert not any(n.split(".")[1] in {"segment_method", "segment_max_side"} | seg
                   for n in vn if n.startswith("verifier.") and not n.startswith("verifier.segments."))


def test_read_only_metadata_is_what_may_change_live():
    live = {s.name for s in P.verifier_node_specs() if s.name.startswith("verifier.") and not s.read_only}
    assert live == {f"verifier.{n}" for n in ("min_global_score", "min_segvlad_score", "min_inliers", "ratio",
                                              "mutual", "ransac_threshold_px", "vote_top_k",
                                              "max_accepted_per_query", "max_threshold_px",
                                              "min_significance", "min_significance_segvlad",
                                              "min_segvlad_z", "segvlad_background",
                                              "segvlad_exclude_recent", "consistency_window",
                                              "consistency_radius")}
    lc = {s.name: s for s in P.loop_closure_specs()}
    assert lc["encoder.model_path"].read_only and lc["map.index"].read_only
    assert not lc["detector.similarity_threshold"].read_only


def test_yaml_is_derived_from_the_dataclasses_and_in_sync():
    text = (ROOT / "config" / "loop_closure.yaml").read_text()
    assert text == P.render_yaml(), "regenerate: python -m megaloc_ros.ros.params > config/loop_closure.yaml"
    cfg = yaml.safe_load(text)["/**"]["ros__parameters"]
    expected = {}
    for node, sections in ((P.LOOP_CLOSURE_NODE, P.node_sections(P.LOOP_CLOSURE_NODE)),
                           (P.VERIFIER_NODE, P.node_sections(P.VERIFIER_NODE))):
        for prefix, cls in sections.items():
            expected.update({k: list(v) if isinstance(v, tuple) else v for k, v in S.flatten(cls(), prefix).items()})
    assert cfg == expected
    # the file read back builds the defaults
    values = S.load_params_file(ROOT / "config" / "loop_closure.yaml", P.VERIFIER_NODE)
    assert S.from_flat(VerifierParams, "verifier", values) == VerifierParams()
    assert S.from_flat(MapSettings, "map", values) == MapSettings()


def test_load_params_file_sections_and_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("/**:\n  ros__parameters:\n    detector:\n      top_k: 3\n    map.index: hnsw\n"
                 "/robot/loop_closure_node:\n  ros__parameters:\n    detector.top_k: 4\n")
    assert S.load_params_file(f) == {"detector.top_k": 3, "map.index": "hnsw"}
    assert S.load_params_file(f, "loop_closure_node", "robot")["detector.top_k"] == 4
    (tmp_path / "bad.yaml").write_text("/**:\n  params: 1\n")
    with pytest.raises(MegalocError, match="no ros__parameters"):
        S.load_params_file(tmp_path / "bad.yaml")
    with pytest.raises(MegalocError, match="cannot read"):
        S.load_params_file(tmp_path / "missing.yaml")


OLD_NAMES = re.compile(r"(?<![\w.])(model_path|map_index)\b")


def test_no_setting_keeps_an_old_name():
    """``model_path`` is ``encoder.model_path``, ``map_index`` is ``map.index`` everywhere a user
    meets a setting (code, config, launch file, README)."""
    files = [ROOT / "README.md", *ROOT.glob("config/*"), *ROOT.glob("launch/*.py"), *ROOT.glob("megaloc_ros/**/*.py")]
    hits = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in OLD_NAMES.finditer(line):
                # in code, Python identifiers of the encoder API (Encoder.model_path,
                # load_encoder(model_path)) are not settings; string literals and ``name:=`` are
                quoted = re.search(rf"""["']{m.group(1)}["']|{m.group(1)}:=""", line)
                if path.suffix != ".py" or quoted:
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
    for flag in ("--model", "--index"):
        for path in ROOT.glob("megaloc_ros/**/*.py"):
            assert f'"{flag}"' not in path.read_text(), f"{path}: {flag} (use --model-path / --set map.index=...)"


def test_camera_parameters_round_trip():
    """eval --live hands a bag's camera to verifier_node as these parameters."""
    from megaloc_ros.ros.params import camera_from_params, camera_to_params
    from megaloc_ros.verification.geometry import Camera, Distortion
    for cam in (Camera([[500, 0, 320], [0, 501, 240], [0, 0, 1]], (640, 480)),
                Camera([[400, 0, 256], [0, 400, 192], [0, 0, 1]], (512, 384), Distortion("plumb_bob", (-0.2, 0.05, 0, 0, 0)))):
        p = camera_to_params(cam)
        assert camera_from_params(p["camera_matrix"], p.get("camera_distortion_model", ""),
                                  p.get("camera_distortion", (0.0,))) == cam
