"""dcdb.tario, the one tar reader and writer: the bytes it writes (tarfile's, webdataset TarWriter's
with mtime 0), round trips, pax long names, damaged tars, byte ranges."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from dcdb import tario


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "bigdata", "bigdata"
    return info


def _tarfile_bytes(members, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            tf.addfile(_info(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _walk(path: Path):
    with tario.TarReader(path) as tar:
        return [(m.name, tar.read(m)) if isinstance(m, tario.Member) else m for m in tar.walk()]


# ------------------------------------------------------------------------------- writing


def test_ustar_headers_are_the_ones_tarfile_writes():
    for name, size in (
        ("0123456789abcdef0123456789abcdef-0.jpg", 1234),
        ("a-12.json", 0),
        ("x-3.txt", 8**10),
        ("k" * 100, 5),
        ("caf\u00e9-0.txt", 7),  # UTF-8 in the name field, as tarfile's ustar format writes it
    ):
        ref = _info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        assert tario.member_header(name, size) == ref
        assert tario.ustar_header(name.encode(), size) == ref


def test_long_names_get_tarfiles_pax_header():
    """Over 100 bytes: a pax header with the path, then the name cut to 100 ASCII bytes; record
    lengths across the 2-to-3 and 3-to-4 digit steps, non-ASCII and undecodable names."""
    names = [f"d/{'k' * n}.jpg" for n in range(95, 1100, 7)]
    names += ["\u00e9" * 60 + ".txt", "k" * 95 + "\udcff.jpg" * 3, "x" * 101]
    for name in names:
        ref = _info(name, 3).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert tario.member_header(name, 3) == ref, name
    for n in range(1, 2000):
        record = tario.pax_record(b"path", b"p" * n)
        assert int(record.split(b" ", 1)[0]) == len(record)


def test_archive_is_tarfiles_and_reads_back(tmp_path):
    """A whole archive (short and long names, empty, block-sized and multi-block data) is byte for
    byte what tarfile writes, and reads back through tario and tarfile alike."""
    members = [
        ("a.jpg", b"\xff\xd8" * 700),
        ("a.txt", b""),
        ("b/" + "n" * 150 + ".json", b"{}"),
        ("c.bin", bytes(range(256)) * 2),  # exactly one block
        ("d.txt", b"x" * 10241),
    ]
    path = tmp_path / "a.tar"
    size = tario.write_tar(path, members)
    raw = path.read_bytes()
    assert size == len(raw) and len(raw) % tario.RECORD == 0
    assert raw == _tarfile_bytes(members, tarfile.PAX_FORMAT)
    assert _walk(path) == members
    with tarfile.open(path) as tf:
        assert [(m.name, tf.extractfile(m).read()) for m in tf] == members
    short = [m for m in members if len(m[0]) <= 100]
    tario.write_tar(path, short)
    assert path.read_bytes() == _tarfile_bytes(short, tarfile.USTAR_FORMAT)


def test_writer_without_pax_refuses_long_names():
    tar = tario.TarWriter(io.BytesIO(), pax=False)
    tar.add("k" * 100, b"fits")
    with pytest.raises(tario.TarNameError, match="longer than 100 bytes"):
        tar.add("k" * 101, b"does not")


def test_samples_are_webdataset_tarwriters_with_mtime_zero(tmp_path):
    """write_sample_shards cuts shards as webdataset's ShardWriter does and each holds the bytes
    webdataset's TarWriter writes with mtime=0 (members in extension order, str as UTF-8, int
    labels as digits, ``_`` entries skipped)."""
    import webdataset as wds

    samples = [{"__key__": f"s{i:08d}", "webp": bytes([i]) * (100 * i + 1), "cls": i, "txt": f"caption {i} \u00e9",
                "_meta": "skipped"} for i in range(7)]
    counts = tario.write_sample_shards(tmp_path, "{}.tar", iter(samples), 3)
    assert counts == [3, 3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.tar", "1.tar", "2.tar"]
    for k, start in enumerate(range(0, 7, 3)):
        buf = io.BytesIO()
        writer = wds.TarWriter(buf, mtime=0)
        for s in samples[start : start + 3]:
            writer.write(dict(s))
        writer.tarstream.close()
        assert (tmp_path / f"{k}.tar").read_bytes() == buf.getvalue()
    assert tario.write_sample_shards(tmp_path / "none", "{}.tar", [], 3) == []
    with pytest.raises(TypeError, match="float"):
        tario.sample_members({"__key__": "k", "x": 1.5})


# ------------------------------------------------------------------------------- reading


def test_pax_path_records():
    assert tario.pax_path(b"30 mtime=1796678057.6337318\n") is None
    recs = tario.pax_record(b"mtime", b"1.5") + tario.pax_record(b"path", b"a/b.jpg") + tario.pax_record(b"uid", b"7")
    assert tario.pax_path(recs) == b"a/b.jpg"
    assert tario.pax_path(b"junk path=x") is None


def _three_samples(tmp_path: Path) -> tuple[Path, list]:
    members = [(f"{k}.{e}", f"{k}{e}".encode() * 200) for k in "abc" for e in ("jpg", "txt")]
    path = tmp_path / "s.tar"
    tario.write_tar(path, members)
    return path, members


def test_damaged_header_is_skipped_and_reading_resumes(tmp_path):
    """A bad header is a Damage at its offset; the walk resumes at the next valid header (tarfile
    stops there) and the samples on both sides of the damage are marked."""
    path, members = _three_samples(tmp_path)
    with tario.TarReader(path) as tar:
        starts = [m.start for m in tar.walk() if isinstance(m, tario.Member)]
    raw = bytearray(path.read_bytes())
    raw[starts[2]] = ord("B")  # b.jpg's name: its checksum no longer matches
    path.write_bytes(bytes(raw))
    items = _walk(path)
    damage = items[2]
    assert isinstance(damage, tario.Damage) and not damage.fatal
    assert damage.offset == starts[2] and damage.reason == f"bad header checksum at byte {starts[2]}"
    assert items[:2] + items[3:] == members[:2] + members[3:]
    with tarfile.open(path) as tf:
        assert [m.name for m in tf] == ["a.jpg", "a.txt"]
    damages: list = []
    with tario.TarReader(path) as tar:
        samples = list(tario.group_samples(tar.walk(), damages))
    assert [(s.key, [e for e, _ in s.members], s.damage is not None) for s in samples] == [
        ("a", ["jpg", "txt"], True), ("b", ["txt"], True), ("c", ["jpg", "txt"], False)]
    assert damages == [damage]


def test_truncated_and_unterminated_tars(tmp_path):
    path, members = _three_samples(tmp_path)
    with tario.TarReader(path) as tar:
        found = [m for m in tar.walk() if isinstance(m, tario.Member)]
    last = found[-1]
    os.truncate(path, last.end)  # no end-of-archive blocks: every member whole
    *whole, end = _walk(path)
    assert whole == members and end.harmless and not end.fatal
    os.truncate(path, last.offset + 10)  # c.txt cut short
    *whole, cut = _walk(path)
    assert whole == members[:-1] and cut.fatal and cut.name == "c.txt" and "truncated" in cut.reason
    os.truncate(path, last.start + 100)  # inside c.txt's header
    *whole, cut = _walk(path)
    assert whole == members[:-1] and cut.fatal and cut.reason == f"truncated header at byte {last.start}"


def test_starts_like_a_tar(tmp_path):
    path, _ = _three_samples(tmp_path)
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    empty = tmp_path / "empty.tar"
    tario.write_tar(empty, [])
    assert empty.stat().st_size == tario.RECORD
    with tario.TarReader(path) as a, tario.TarReader(gz) as b, tario.TarReader(empty) as c:
        assert a.starts_like_a_tar() and not b.starts_like_a_tar() and c.starts_like_a_tar()
        assert list(c.walk()) == []


def test_range_members_reads_one_samples_bytes(tmp_path):
    """A sample's byte range (start of its first header to the end of its last member's padded
    data, what the shard index stores) splits into its members; a range that is not whole members
    is refused with the reason."""
    path = tmp_path / "s.tar"
    long = "k" * 120
    members = [(f"{long}.jpg", b"J" * 700), (f"{long}.txt", b"caption"), ("z.txt", b"next")]
    tario.write_tar(path, members)
    raw = path.read_bytes()
    with tario.TarReader(path) as tar:
        (sample, nxt) = list(tario.group_samples(tar.walk(), []))
    view = memoryview(raw)[sample.start : sample.end]
    assert [(n, bytes(d)) for n, d in tario.range_members(view)] == members[:2]
    assert sample.start == 0 and nxt.start == sample.end

    def error(lo: int, hi: int, patch: tuple[int, bytes] | None = None) -> str:
        buf = bytearray(raw[lo:hi])
        if patch:
            buf[patch[0] : patch[0] + len(patch[1])] = patch[1]
        with pytest.raises(tario.TarRangeError) as exc:
            list(tario.range_members(memoryview(bytes(buf))))
        return str(exc.value)

    assert error(0, 300) == "truncated header"
    assert error(nxt.start, len(raw)) == "end-of-archive marker inside the sample's byte range"
    assert error(0, sample.end, (0, b"K")) == "bad header checksum"
    jpg = next(m for _, m in sample.members)
    assert error(0, jpg.offset + 100) == "member truncated (100 of 700 bytes)"
