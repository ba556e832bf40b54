"""rosbag2 writing and reading (`megaloc-ros make-bag`, BagReader) on the shipped real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megaloc_ros.io import bag as B
from megaloc_ros import cli
from megaloc_ros.errors import BagError, ImageDecodeError, MegalocError
from megaloc_ros.io.trajectory import Trajectory, read_trajectory, write_trajectory_tum
from megaloc_ros.io.images import read_image_file

S = 1_000_000_000


def test_natural_order(tmp_path):
    for n in (10, 2, 1, 33):
        (tmp_path / f"{n}.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in B.list_images(tmp_path)] == ["1.jpg", "2.jpg", "10.jpg", "33.jpg"]
    with pytest.raises(MegalocError, match="not found"):
        B.list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MegalocError, match="no .jpg"):
        B.list_images(tmp_path / "empty")


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_raw_bag_round_trip_with_poses(tmp_path, rtabmap_seq, storage, capsys):
    # a made-up trajectory for 12 frames at 2 Hz, written as TUM and replayed as PoseStamped
    n = 12
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 0, 3] = np.arange(n) * 0.5
    poses[:, :3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    traj_file = tmp_path / "traj.txt"
    write_trajectory_tum(traj_file, Trajectory(np.arange(n) * S // 2, poses))
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, p in enumerate(rtabmap_seq.image_paths[:n]):
        (img_dir / f"{i + 1}.jpg").write_bytes(p.read_bytes())
    out = tmp_path / "bag"
    rc = cli.main(["make-bag", str(img_dir), "-o", str(out), "--storage", storage, "--rate", "2",
                   "--poses", str(traj_file), "--quiet"])
    assert rc == 0
    assert f"/camera/image_raw ({n} x sensor_msgs/Image)" in capsys.readouterr().out
    with B.BagReader(out) as r:
        assert {t.name: t.count for t in r.topics} == {"/camera/image_raw": n, "/pose": n}
        frames = list(r.images("/camera/image_raw"))
        traj = r.trajectory("/pose")
        with pytest.raises(BagError, match="topic /pose .* has type geometry_msgs/msg/PoseStamped, expected"):
            next(r.images("/pose"))
    assert [f.stamp_ns for f in frames] == [i * S // 2 for i in range(n)]
    for f, p in zip(frames, rtabmap_seq.image_paths[:n]):
        assert np.array_equal(f.rgb, read_image_file(p))
        assert f.frame_id == "camera" and f.decode_ms >= 0
    assert np.allclose(traj.poses, poses, atol=1e-9)
    # the bag refuses to be overwritten unless asked
    assert cli.main(["make-bag", str(img_dir), "-o", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["make-bag", str(img_dir), "-o", str(out), "--quiet", "--force"]) == 0


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_compressed_bag_keeps_file_bytes_and_dataset_stamps(tmp_path, corridor_seq, storage):
    out = B.write_bag(tmp_path / "c", corridor_seq.image_paths, corridor_seq.stamps_ns,
                      storage=storage, compressed=True)
    with B.BagReader(out) as r:
        assert [t.name for t in r.topics] == ["/camera/image_raw/compressed"]
        frames = list(r.images("/camera/image_raw/compressed"))
    assert len(frames) == len(corridor_seq) == 222
    assert [f.stamp_ns for f in frames] == corridor_seq.stamps_ns.tolist()
    for i in (0, 111, 221):
        assert np.array_equal(frames[i].rgb, corridor_seq.load_rgb(i))


def test_make_bag_dataset_and_stamps_file(tmp_path, capsys):
    assert cli.main(["make-bag", "--dataset", "rtabmap", "-o", str(tmp_path / "r"), "--storage",
                     "mcap", "--compressed", "--quiet"]) == 0
    with B.BagReader(tmp_path / "r") as r:
        assert r.count("/camera/image_raw/compressed") == 84
    stamps = tmp_path / "stamps.txt"
    stamps.write_text("# seconds\n" + "\n".join(f"{100 + 0.1 * i:.1f}" for i in range(3)) + "\n")
    imgs = tmp_path / "three"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.jpg").write_bytes(open(f"data/rtabmap/{i + 1}.jpg", "rb").read())
    assert cli.main(["make-bag", str(imgs), "-o", str(tmp_path / "s"), "--stamps", str(stamps),
                     "--quiet"]) == 0
    with B.BagReader(tmp_path / "s") as r:
        assert [f.stamp_ns for f in r.images("/camera/image_raw")] == [100 * S, 100 * S + S // 10,
                                                                      100 * S + 2 * S // 10]
    stamps.write_text("1\n2\n")
    assert cli.main(["make-bag", str(imgs), "-o", str(tmp_path / "t"), "--stamps", str(stamps)]) == 2
    assert "2 stamps for 3 images" in capsys.readouterr().err


def _bag_with_encoding(path, encoding):
    """A one-frame raw bag whose encoding field says ``encoding``."""
    from rosbags.rosbag2 import Writer
    ts = B._typestore()
    with Writer(path, version=9) as w:
        c = w.add_connection("/cam", B.IMAGE_TYPE, typestore=ts)
        msg = ts.types[B.IMAGE_TYPE](header=B._header(ts, 5, "cam"), height=2, width=2,
                                     encoding=encoding, is_bigendian=0, step=4,
                                     data=np.zeros(8, np.uint8))
        w.write(c, 5, ts.serialize_cdr(msg, B.IMAGE_TYPE))
    return path


def test_a_raw_bayer_camera_bag_reads_in_colour(tmp_path, rtabmap_seq):
    """A bag of an industrial camera's raw Bayer images (bayer_rggb8, rows padded to 4 bytes
    more): read back in colour, as the nodes and `eval` see it."""
    from rosbags.rosbag2 import Writer
    from test_images import _mosaic
    frame = rtabmap_seq.load_rgb(3)
    h, w = frame.shape[:2]
    raw = np.zeros((h, w + 4), np.uint8)
    raw[:, :w] = _mosaic(frame, "rggb")
    ts = B._typestore()
    with Writer(tmp_path / "bayer", version=9) as wr:
        c = wr.add_connection("/cam/image_raw", B.IMAGE_TYPE, typestore=ts)
        msg = ts.types[B.IMAGE_TYPE](header=B._header(ts, 7 * S, "cam"), height=h, width=w,
                                     encoding="bayer_rggb8", is_bigendian=0, step=w + 4, data=raw.ravel())
        wr.write(c, 7 * S, ts.serialize_cdr(msg, B.IMAGE_TYPE))
    with B.BagReader(tmp_path / "bayer") as r:
        (img,) = list(r.images("/cam/image_raw"))
    assert img.rgb.shape == frame.shape and img.stamp_ns == 7 * S
    assert np.abs(img.rgb[4:-4, 4:-4].astype(int) - frame[4:-4, 4:-4]).mean() < 2.0


def test_bad_bags_raise_one_clear_error(tmp_path, rtabmap_seq):
    good = B.write_bag(tmp_path / "good", rtabmap_seq.image_paths[:3], [0, S, 2 * S], storage="mcap",
                       compressed=True)
    with B.BagReader(good) as r:
        with pytest.raises(BagError, match=r"topic /nope is not in bag .*image topics in the bag: "
                                           r"/camera/image_raw/compressed \(sensor_msgs/CompressedImage\)"):
            list(r.images("/nope"))
        with pytest.raises(BagError, match="has no pose topics"):
            r.trajectory("/pose")
    # truncated mcap (recording killed) and random bytes
    trunc = tmp_path / "trunc"
    import shutil
    shutil.copytree(good, trunc)
    f = next(trunc.glob("*.mcap"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BagError, match="cannot open bag"):
        B.BagReader(trunc).open()
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(BagError, match="cannot open bag"):
        B.BagReader(trunc).open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="not a rosbag2 bag"):
        B.BagReader(tmp_path / "empty").open()
    with pytest.raises(BagError, match="not found"):
        B.BagReader(tmp_path / "missing").open()
    # an encoding the decoder does not know
    bad = _bag_with_encoding(tmp_path / "nv21", "nv21")
    with B.BagReader(bad) as r:
        with pytest.raises(ImageDecodeError, match="image 0 on /cam: unsupported image encoding 'nv21'"):
            list(r.images("/cam"))


def test_read_trajectory_from_kitti_matches_frames(tmp_path):
    k = tmp_path / "poses.txt"
    k.write_text("\n".join("1 0 0 %d 0 1 0 0 0 0 1 0" % i for i in range(3)))
    tr = read_trajectory(k, frame_stamps_ns=[0, S, 2 * S])
    assert tr.positions[:, 0].tolist() == [0, 1, 2]


def test_garbage_message_inside_a_bag(tmp_path, rtabmap_seq):
    """A bag that opens fine but holds one damaged message fails on that message, clearly."""
    import sqlite3
    bag = B.write_bag(tmp_path / "b", rtabmap_seq.image_paths[:3], [0, S, 2 * S], storage="sqlite3",
                      compressed=True)
    db = next(bag.glob("*.db3"))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE messages SET data = ? WHERE id = 2", (b"\x00\x01\x00\x00" + b"\xff" * 40,))
    with B.BagReader(bag) as r:
        it = r.images("/camera/image_raw/compressed")
        assert next(it).index == 0
        with pytest.raises(BagError, match="message 1 on /camera/image_raw/compressed .* cannot be "
                                           "deserialised as sensor_msgs/msg/CompressedImage"):
            next(it)


def _corrupt_message(bag, msg_id: int, data: bytes, stamp_ns: int = 0):
    """Replace message ``msg_id`` (1-based) of a sqlite3 compressed bag by a well-formed
    CompressedImage whose image bytes are ``data``."""
    import sqlite3
    ts = B._typestore()
    msg = ts.types[B.COMPRESSED_TYPE](header=B._header(ts, stamp_ns, "camera"), format="jpeg",
                                      data=np.frombuffer(data, np.uint8))
    with sqlite3.connect(next(Path(bag).glob("*.db3"))) as con:
        con.execute("UPDATE messages SET data = ? WHERE id = ?",
                    (bytes(ts.serialize_cdr(msg, B.COMPRESSED_TYPE)), msg_id))


def test_reader_skips_undecodable_frames_on_request(tmp_path, rtabmap_seq):
    bag = B.write_bag(tmp_path / "b", rtabmap_seq.image_paths[:4], [0, S, 2 * S, 3 * S], compressed=True)
    _corrupt_message(bag, 2, b"\xff\xd8 not a jpeg", stamp_ns=S)
    with B.BagReader(bag) as r:
        with pytest.raises(ImageDecodeError, match="image 1 on /camera/image_raw/compressed"):
            list(r.images("/camera/image_raw/compressed"))
        bad = []
        frames = list(r.images("/camera/image_raw/compressed", on_error=lambda *a: bad.append(a)))
    assert [f.index for f in frames] == [0, 2, 3]
    assert [(i, t) for i, t, _ in bad] == [(1, S)] and isinstance(bad[0][2], ImageDecodeError)
    with B.BagReader(bag) as r:  # only some frames: the others are not decoded, so not reported
        bad.clear()
        some = list(r.images("/camera/image_raw/compressed", on_error=lambda *a: bad.append(a), only=[3, 0]))
    assert [f.index for f in some] == [0, 3] and bad == []
    assert np.array_equal(some[1].rgb, frames[2].rgb)


def test_make_bag_checks_images_and_leaves_nothing_half_written(tmp_path, rtabmap_seq, capsys):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, p in enumerate(rtabmap_seq.image_paths[:5]):
        (img_dir / f"{i + 1}.jpg").write_bytes(p.read_bytes())
    jpg = (img_dir / "4.jpg").read_bytes()
    (img_dir / "4.jpg").write_bytes(jpg[: len(jpg) // 3])  # a truncated JPEG (a copy that failed)
    out = tmp_path / "bag"
    for flags in (["--compressed"], []):
        assert cli.main(["make-bag", str(img_dir), "-o", str(out), "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert "4.jpg" in err and "Traceback" not in err
        assert not out.exists()  # no half-written bag
        assert [p.name for p in tmp_path.iterdir()] == ["imgs"]
    # replacing a good bag: a failure keeps the old one as it was
    good = tmp_path / "good"
    (good / "imgs").mkdir(parents=True)
    for i, p in enumerate(rtabmap_seq.image_paths[:3]):
        (good / "imgs" / f"{i + 1}.jpg").write_bytes(p.read_bytes())
    assert cli.main(["make-bag", str(good / "imgs"), "-o", str(out), "--quiet", "--compressed"]) == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    assert cli.main(["make-bag", str(img_dir), "-o", str(out), "--quiet", "--compressed", "--force"]) == 2
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag", "good", "imgs"]
    with B.BagReader(out) as r:
        assert r.count("/camera/image_raw/compressed") == 3
    # and a good replacement replaces it
    (img_dir / "4.jpg").write_bytes(jpg)
    assert cli.main(["make-bag", str(img_dir), "-o", str(out), "--quiet", "--compressed", "--force"]) == 0
    with B.BagReader(out) as r:
        assert r.count("/camera/image_raw/compressed") == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag", "good", "imgs"]
