"""uid codec and uid files, checked against DataComp's own conversion (int(uid[:16], 16), ...)."""

import numpy as np
import pyarrow as pa
import pytest

from dcdb import uids as U
from dcdb.errors import UidError


def datacomp_way(hexes):
    """How DataComp's baselines build a uid array, then `uids.sort()` before np.save."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in hexes], np.dtype("u8,u8"))
    arr.sort()
    return arr


@pytest.fixture
def hexes():
    rng = np.random.default_rng(7)
    vals = [f"{int(x):016x}{int(y):016x}" for x, y in rng.integers(0, 2**63, size=(500, 2), dtype=np.uint64) * 2 + 1]
    # edge cases: zero, max, shared high word, duplicates
    vals += ["0" * 32, "f" * 32, "00000000000000ff" + "0" * 16, "00000000000000ff" + "0" * 15 + "1"]
    vals += vals[:5]
    return vals


def test_from_hex_matches_divmod(hexes):
    arr = U.from_hex(hexes)
    for u, (hi, lo) in zip(hexes, arr.tolist()):
        assert (hi, lo) == divmod(int(u, 16), 2**64)


def test_sort_matches_numpy_structured_sort(hexes):
    assert U.sort(U.from_hex(hexes)).tobytes() == datacomp_way(hexes).tobytes()
    assert U.is_sorted(U.sort(U.from_hex(hexes)))
    assert not U.is_sorted(U.from_hex(hexes))
    done = U.sort(U.from_hex(hexes))  # already sorted input takes the linear path: a copy
    again = U.sort(done)
    assert again.tobytes() == done.tobytes() and again is not done
    assert U.sort(done, copy=False) is done
    assert U.sort(U.from_hex(hexes), copy=False).tobytes() == done.tobytes()
    almost = done.copy()
    almost[[3, 4]] = almost[[4, 3]]  # one swapped pair is caught by the check
    assert U.sort(almost).tobytes() == done.tobytes()


def test_lower_case_check_covers_every_position():
    base = "0123456789abcdef" * 2
    for i in range(32):
        if base[i].isalpha():
            bad = base[:i] + base[i].upper() + base[i + 1:]
            with pytest.raises(UidError, match="lowercase"):
                U.from_arrow(pa.array([base, bad, base]))


def test_arrow_and_hex_round_trip(hexes):
    arr = U.from_hex(hexes)
    assert U.to_hex(arr) == hexes
    assert U.from_arrow(pa.array(hexes)).tobytes() == arr.tobytes()
    assert U.to_arrow(arr).to_pylist() == hexes
    chunked = pa.chunked_array([pa.array(hexes[:10]), pa.array(hexes[10:])])
    assert U.from_arrow(chunked).tobytes() == arr.tobytes()
    assert U.from_arrow(pa.array(hexes).slice(3, 7)).tobytes() == arr[3:10].tobytes()
    # decoded in place into a slice of a larger buffer (how query results avoid a copy)
    buf = np.zeros(len(hexes) + 4, U.UID_DTYPE)
    got = U.from_arrow(chunked, out=buf[2 : 2 + len(hexes)])
    assert got.tobytes() == arr.tobytes() and buf[:2].tobytes() == buf[-2:].tobytes() == bytes(32)


@pytest.mark.parametrize(
    "bad",
    ["ABCDEF" + "0" * 26, "g" * 32, "0" * 31, "0" * 33, "é" + "0" * 31, " " + "0" * 31],
)
def test_bad_uids_are_rejected(bad):
    with pytest.raises(UidError, match="hex"):
        U.from_hex(["0" * 32, bad])
    with pytest.raises(UidError):
        U.from_arrow(pa.array(["0" * 32, bad]))


def test_null_uid_rejected():
    with pytest.raises(UidError, match="NULL"):
        U.from_arrow(pa.array(["0" * 32, None]))


def test_save_is_datacomp_npy_and_load_reads_raw(tmp_path, hexes):
    out = U.save(tmp_path / "u.npy", U.from_hex(hexes))
    loaded = np.load(out)
    assert loaded.dtype == np.dtype("u8,u8")
    assert loaded.tobytes() == datacomp_way(hexes).tobytes()
    raw = tmp_path / "u.bin"
    loaded.tofile(raw)
    assert U.load(raw).tobytes() == loaded.tobytes()
    assert U.load(out).tobytes() == loaded.tobytes()
    assert not list(tmp_path.glob("*dcdb-tmp*"))


def test_load_rejects_wrong_layouts(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(UidError, match="dtype"):
        U.load(tmp_path / "f.npy")
    (tmp_path / "odd.bin").write_bytes(b"x" * 17)
    with pytest.raises(UidError, match="16-byte"):
        U.load(tmp_path / "odd.bin")
    with pytest.raises(UidError, match="does not exist"):
        U.load(tmp_path / "missing.npy")


def test_multiset_algebra():
    a = U.from_hex(["1" * 32, "1" * 32, "2" * 32, "3" * 32])
    b = U.from_hex(["1" * 32, "3" * 32, "3" * 32, "4" * 32])
    assert U.to_hex(U.union(a, b)) == ["1" * 32] * 2 + ["2" * 32] + ["3" * 32] * 2 + ["4" * 32]
    assert U.to_hex(U.intersect(a, b)) == ["1" * 32, "3" * 32]
    assert U.to_hex(U.minus(a, b)) == ["2" * 32]
    assert U.to_hex(U.minus(b, a)) == ["4" * 32]
    e = U.empty()
    assert len(U.union(e, e)) == 0 and len(U.intersect(a, e)) == 0
    assert U.minus(a, e).tobytes() == U.sort(a).tobytes()


def test_big_conversion_is_vectorised():
    rng = np.random.default_rng(0)
    arr = np.empty(200_000, U.UID_DTYPE)
    arr["f0"] = rng.integers(0, 2**63, len(arr), dtype=np.uint64)
    arr["f1"] = rng.integers(0, 2**63, len(arr), dtype=np.uint64)
    assert U.from_arrow(U.to_arrow(arr)).tobytes() == arr.tobytes()


def test_count_unique(hexes):
    arr = U.from_hex(hexes)
    assert U.count_unique(arr) == len(set(hexes)) == U.count_unique(U.sort(arr))
    assert U.count_unique(U.empty()) == 0
