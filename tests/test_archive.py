"""Deterministic archives and their safe extraction, with real files, real tar, run as root."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from treeutil import (
    BAD_NAME,
    HARDLINKS,
    LONG_NAME,
    NEW_MTIME,
    SPARSE_FILE,
    SPARSE_SIZE,
    UTF8_NAME,
    Entry,
    make_feature_tree,
    snapshot,
)

from provision.archive import ArchiveInfo, Compression, write_archive
from provision.errors import ArchiveError, DigestMismatch
from provision.run import output, run
from provision.unpack import check_members, detect_compression, unpack

EPOCH = 1_700_000_000



def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def clamped(snap: dict[str, Entry], epoch: int) -> dict[str, Entry]:
    return {k: v._replace(mtime=min(v.mtime, epoch)) for k, v in snap.items()}


def leftovers(parent: Path, *keep: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p not in keep)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "root"
    root.mkdir()
    make_feature_tree(root)
    return root


@pytest.fixture(scope="module")
def archive(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ArchiveInfo]:
    dest = tmp_path_factory.mktemp("archive") / "root.tar.zst"
    return dest, write_archive(tree, dest, source_date_epoch=EPOCH)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, to run out of space on."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", mnt], capture=True)
    try:
        yield mnt
    finally:
        run(["umount", mnt], capture=True)


# --- the feature tree itself ------------------------------------------------------------------


def test_feature_tree_has_what_the_tests_rely_on(tree: Path) -> None:
    snap = snapshot(tree)
    assert snap["etc/shadow"][1:4] == (0o640, 0, 42)
    assert snap["usr/bin/su"].mode == 0o4755
    assert snap["usr/bin/wall"].mode == 0o2755
    assert snap["tmp"].mode == 0o1777
    assert dict(snap["usr/bin/ping"].xattrs).keys() == {"security.capability"}
    assert snap["dev/null"].type == "char" and snap["dev/null"].rdev == os.makedev(1, 3)
    assert snap["dev/loop0"].type == "block"
    assert snap["run/initctl"].type == "fifo"
    assert snap[HARDLINKS[0]].hardlinks == HARDLINKS
    assert snap["etc/alternatives/ping"].target == "/usr/bin/ping"
    assert snap["usr/bin/ping6"].target == "ping"
    assert len(snap[SPARSE_FILE].data_map) == 2
    assert os.lstat(tree / SPARSE_FILE).st_blocks * 512 < 1 << 20
    assert {e.mtime for e in snap.values()} >= {NEW_MTIME}
    assert any(e.mtime < EPOCH for e in snap.values())
    # The order tar will see is not the name order; the archive must not care.
    assert os.listxattr(tree / "srv/xattr.txt") != sorted(os.listxattr(tree / "srv/xattr.txt"))


# --- writing ----------------------------------------------------------------------------------


def test_archive_info_describes_the_file(archive: tuple[Path, ArchiveInfo]) -> None:
    dest, info = archive
    assert info.compression is Compression.ZSTD
    assert info.digest == sha256_file(dest)
    assert info.size == dest.stat().st_size
    tar = run(["zstd", "-dc", dest], capture=True).stdout
    assert info.tar_sha256 == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert info.tar_size == len(tar)
    assert info.tar_size % 10240 == 0
    assert detect_compression(dest) is Compression.ZSTD
    assert leftovers(dest.parent, dest) == []


def test_tar_stream_is_as_specified(archive: tuple[Path, ArchiveInfo]) -> None:
    dest, _ = archive
    tar = run(["zstd", "-dc", dest], capture=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names[0] == "."
    assert all(n == "." or n.startswith("./") for n in names)
    assert names == sorted(names, key=lambda n: n.encode(errors="surrogateescape"))
    assert all(m.mtime <= EPOCH for m in members)
    assert all(m.uname == "" and m.gname == "" for m in members)
    for m in members:
        assert "atime" not in m.pax_headers and "ctime" not in m.pax_headers
    by_name = {m.name: m for m in members}
    assert (by_name["./etc/shadow"].uid, by_name["./etc/shadow"].gid) == (0, 42)
    assert by_name["./" + HARDLINKS[1]].islnk()
    assert by_name["./" + SPARSE_FILE].sparse is not None
    # No PID-dependent names anywhere (the default pax header and sparse 1.0 names have one).
    assert b"PaxHeaders/" in tar and b"PaxHeaders." not in tar and b"GNUSparseFile" not in tar


def test_same_tree_twice_gives_the_same_bytes(tree: Path, tmp_path: Path) -> None:
    a = write_archive(tree, tmp_path / "a.tar.zst", source_date_epoch=EPOCH)
    for p in tree.rglob("*"):  # reading changes atimes, which must not matter
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 1 << 20:
            p.read_bytes()
    b = write_archive(tree, tmp_path / "b.tar.zst", source_date_epoch=EPOCH)
    assert a == b
    assert (tmp_path / "a.tar.zst").read_bytes() == (tmp_path / "b.tar.zst").read_bytes()


def test_zstd_thread_count_does_not_change_the_bytes(tree: Path, tmp_path: Path) -> None:
    one = write_archive(tree, tmp_path / "t1.tar.zst", source_date_epoch=EPOCH, threads=1)
    all_cores = write_archive(tree, tmp_path / "t0.tar.zst", source_date_epoch=EPOCH, threads=0)
    four = write_archive(tree, tmp_path / "t4.tar.zst", source_date_epoch=EPOCH, threads=4)
    assert one == all_cores == four


def test_epoch_and_level_change_the_bytes(
    tree: Path, tmp_path: Path, archive: tuple[Path, ArchiveInfo]
) -> None:
    _, info = archive
    later = write_archive(tree, tmp_path / "e.tar.zst", source_date_epoch=EPOCH + 1)
    assert later.tar_sha256 != info.tar_sha256
    fast = write_archive(tree, tmp_path / "l.tar.zst", source_date_epoch=EPOCH, level=1)
    assert fast.tar_sha256 == info.tar_sha256


def test_xattr_order_does_not_change_the_bytes(tmp_path: Path) -> None:
    trees = []
    for order in (("user.b", "user.a", "user.c"), ("user.c", "user.a", "user.b")):
        root = tmp_path / "-".join(order)
        root.mkdir()
        f = root / "f"
        f.write_bytes(b"x")
        for name in order:
            os.setxattr(f, name, name.encode())
        os.utime(f, (1_000_000_000, 1_000_000_000))
        os.utime(root, (1_000_000_000, 1_000_000_000))
        assert os.listxattr(f) == list(order)
        trees.append(root)
    a = write_archive(trees[0], tmp_path / "a.tar.zst", source_date_epoch=EPOCH)
    b = write_archive(trees[1], tmp_path / "b.tar.zst", source_date_epoch=EPOCH)
    assert a.digest == b.digest


# --- round trips ------------------------------------------------------------------------------


def assert_same_tree(src: Path, out: Path) -> None:
    want = clamped(snapshot(src), EPOCH)
    got = snapshot(out)
    assert sorted(got) == sorted(want)
    diffs = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert diffs == {}
    sparse = os.lstat(out / SPARSE_FILE)
    assert sparse.st_size == SPARSE_SIZE
    assert sparse.st_blocks * 512 < 1 << 20  # still sparse


def test_roundtrip_zstd(tree: Path, archive: tuple[Path, ArchiveInfo], tmp_path: Path) -> None:
    dest, info = archive
    out = tmp_path / "out"
    unpack(dest, out, expected_digest=info.digest)
    assert_same_tree(tree, out)
    assert snapshot(out)["etc/shadow"].mtime < EPOCH  # older ones are kept, not clamped up
    assert (out / BAD_NAME).read_bytes() == b"not utf-8\n"
    assert (out / UTF8_NAME).exists() and (out / LONG_NAME).exists()
    assert "cap_net_raw=ep" in output(["/usr/sbin/getcap", out / "usr/bin/ping"])
    assert os.stat(out / "etc/shadow").st_mtime_ns == 1_000_000_000_123_456_789
    assert leftovers(tmp_path, out) == []


def test_roundtrip_xz(tree: Path, tmp_path: Path, archive: tuple[Path, ArchiveInfo]) -> None:
    dest = tmp_path / "root.tar.xz"
    info = write_archive(tree, dest, source_date_epoch=EPOCH, compression=Compression.XZ)
    assert info.compression is Compression.XZ
    assert info.tar_sha256 == archive[1].tar_sha256  # same tar stream, other compressor
    assert dest.read_bytes()[:6] == b"\xfd7zXZ\x00"
    assert detect_compression(dest) is Compression.XZ
    again = write_archive(
        tree, tmp_path / "again.tar.xz", source_date_epoch=EPOCH, compression=Compression.XZ
    )
    assert again == info
    out = tmp_path / "out"
    unpack(dest, out, expected_digest=info.digest)
    assert_same_tree(tree, out)


def test_exclude(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "ex.tar.zst"
    write_archive(
        tree, dest, source_date_epoch=EPOCH, exclude=["/usr/share/doc/*", "/var/cache/apt", "/srv/xattr.txt/"]
    )
    out = tmp_path / "out"
    unpack(dest, out)
    got = snapshot(out)
    want = {
        k: v
        for k, v in clamped(snapshot(tree), EPOCH).items()
        if not k.startswith(("usr/share/doc/", "var/cache/apt")) and k != "srv/xattr.txt"
    }
    assert "usr/share/doc" in got and "var/cache" in got and "var/cache/debconf" in got
    # Excluding entries changes directory sizes on some file systems, nothing else.
    assert got == want


@pytest.mark.parametrize("pattern", ["usr/share/doc", "/", ""])
def test_exclude_must_be_an_absolute_in_root_path(tree: Path, tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ArchiveError, match="exclude pattern"):
        write_archive(tree, tmp_path / "x.tar.zst", source_date_epoch=EPOCH, exclude=[pattern])
    assert leftovers(tmp_path) == []


def test_unpack_into_existing_dest_does_nothing(archive: tuple[Path, ArchiveInfo], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("keep")
    unpack(archive[0], out, expected_digest="sha256:" + "0" * 64)
    assert [p.name for p in out.iterdir()] == ["mine"]
    assert leftovers(tmp_path, out) == []


# --- refusing ---------------------------------------------------------------------------------


def member(
    name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b""
) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.size = len(data) if kind in tarfile.REGULAR_TYPES else 0
    return ti, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


def zstd(data: bytes) -> bytes:
    return run(["zstd", "-q", "-c"], input=data, capture=True).stdout


ROOT = member(".", tarfile.DIRTYPE)
HOSTILE: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str, str]] = {
    # id: (members, offending member, reason in the message)
    "absolute": (
        [ROOT, member("/etc/cron.d/x", data=b"* * * * * root sh\n")],
        "/etc/cron.d/x",
        "absolute path",
    ),
    "dotdot": ([ROOT, member("../x", data=b"x")], "../x", "'..'"),
    "dotdot-inside": ([ROOT, member("./a/../../x", data=b"x")], "./a/../../x", "'..'"),
    "hardlink-absolute": ([ROOT, member("./h", tarfile.LNKTYPE, "/etc/passwd")], "./h", "absolute"),
    "hardlink-dotdot": ([ROOT, member("./h", tarfile.LNKTYPE, "../etc/passwd")], "./h", "'..'"),
    "hardlink-not-earlier": (
        [ROOT, member("./h", tarfile.LNKTYPE, "./later"), member("./later", data=b"x")],
        "./h",
        "not an earlier member",
    ),
    "symlink-escapes": (
        [ROOT, member("./a", tarfile.DIRTYPE), member("./a/up", tarfile.SYMTYPE, "../../etc")],
        "./a/up",
        "climbs above the root",
    ),
    "symlink-escapes-later": (
        [ROOT, member("./s", tarfile.SYMTYPE, "x/../../y")],
        "./s",
        "climbs above the root",
    ),
    "write-through-symlink": (
        [
            ROOT,
            member("./evil", tarfile.SYMTYPE, "/etc"),
            member("./evil/passwd", data=b"root::0:0::/:/bin/sh\n"),
        ],
        "./evil/passwd",
        "through symlink",
    ),
    "write-through-relative-symlink": (
        [
            ROOT,
            member("./d", tarfile.DIRTYPE),
            member("./d/s", tarfile.SYMTYPE, ".."),
            member("./d/s/x", data=b"x"),
        ],
        "./d/s/x",
        "through symlink",
    ),
    "write-through-hardlinked-symlink": (
        [
            ROOT,
            member("./s", tarfile.SYMTYPE, "/etc"),
            member("./h", tarfile.LNKTYPE, "./s"),
            member("./h/passwd", data=b"x"),
        ],
        "./h/passwd",
        "through symlink",
    ),
    "symlink-over-implicit-dir": (
        [
            ROOT,
            member("./d/f", data=b"x"),
            member("./d", tarfile.SYMTYPE, "/etc"),
            member("./h", tarfile.LNKTYPE, "./d/f"),
        ],
        "./d",
        "changes type from directory to symlink",
    ),
    "parent-is-a-file": (
        [ROOT, member("./a", data=b"x"), member("./a/b", data=b"y")],
        "./a/b",
        "parent 'a' is a regular file",
    ),
    "unsupported-type": ([ROOT, member("./v", b"V")], "./v", "unsupported member type"),
    "type-change": ([ROOT, member("./a", data=b"x"), member("./a", tarfile.DIRTYPE)], "./a", "changes type"),
    "symlink-replaces-dir": (
        [ROOT, member("./a", tarfile.DIRTYPE), member("./a", tarfile.SYMTYPE, "/etc")],
        "./a",
        "changes type",
    ),
    "root-not-a-dir": ([member(".", tarfile.SYMTYPE, "/")], ".", "not a directory"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case: str, tmp_path: Path) -> None:
    members, offender, reason = HOSTILE[case]
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(zstd(tar_bytes(members)))
    with pytest.raises(ArchiveError, match=reason) as e:
        check_members(bad)
    assert repr(offender) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ArchiveError, match=reason):
        unpack(bad, tmp_path / "out", expected_digest=sha256_file(bad))
    assert leftovers(tmp_path, bad) == []


def test_harmless_tricky_archive_is_accepted(tmp_path: Path) -> None:
    good = tmp_path / "good.tar.zst"
    good.write_bytes(
        zstd(
            tar_bytes(
                [
                    ROOT,
                    member("./etc", tarfile.DIRTYPE),
                    member("./etc/alternatives", tarfile.DIRTYPE),
                    member("./etc/alternatives/awk", tarfile.SYMTYPE, "/usr/bin/mawk"),  # absolute is fine
                    member("./etc/up", tarfile.SYMTYPE, "../etc/./alternatives/.."),  # stays inside
                    member("./a", data=b"x"),
                    member("./a", data=b"y"),  # same type twice
                    member("./b", tarfile.LNKTYPE, "a"),
                    member("./dev", tarfile.DIRTYPE),
                    member("./dev/fifo", tarfile.FIFOTYPE),
                ]
            )
        )
    )
    assert check_members(good) == 10
    unpack(good, tmp_path / "out")
    assert (tmp_path / "out/b").read_bytes() == b"y"
    assert os.readlink(tmp_path / "out/etc/alternatives/awk") == "/usr/bin/mawk"


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: t + b"\x01" + b"\0" * 20000, id="garbage-after-end"),
        # Layout: ./ header, a header, a data, b header, b data, end marker, padding.
        pytest.param(lambda t: t[:1536] + b"\x55" * 512 + t[2048:], id="bad-header-inside"),
        pytest.param(lambda t: t[:2560], id="no-end-marker"),
        pytest.param(lambda t: t[:2048], id="data-cut-off"),
        pytest.param(lambda t: b"not a tar file at all" * 100, id="not-tar"),
    ],
)
def test_broken_tar_inside_good_compression_is_refused(
    mangle: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    members = [ROOT, member("./a", data=b"a" * 100), member("./b", data=b"b" * 100)]
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(zstd(mangle(tar_bytes(members))))
    with pytest.raises(ArchiveError):
        check_members(bad)
    with pytest.raises(ArchiveError):
        unpack(bad, tmp_path / "out")
    assert leftovers(tmp_path, bad) == []


@pytest.mark.parametrize("compression", list(Compression))
def test_truncated_archive_is_refused(tree: Path, tmp_path: Path, compression: Compression) -> None:
    full = tmp_path / "full"
    write_archive(tree, full, source_date_epoch=EPOCH, compression=compression)
    data = full.read_bytes()
    full.unlink()
    cut = tmp_path / "cut"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=f"truncated {compression} stream") as e:
        unpack(cut, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert leftovers(tmp_path, cut) == []


@pytest.mark.parametrize("compression", list(Compression))
def test_corrupt_archive_is_refused(tree: Path, tmp_path: Path, compression: Compression) -> None:
    full = tmp_path / "full"
    write_archive(tree, full, source_date_epoch=EPOCH, compression=compression)
    data = bytearray(full.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    full.write_bytes(data)
    with pytest.raises(ArchiveError, match="corrupt"):
        unpack(full, tmp_path / "out")
    assert leftovers(tmp_path, full) == []


def test_wrong_digest_is_refused(archive: tuple[Path, ArchiveInfo], tmp_path: Path) -> None:
    dest, info = archive
    wrong = "sha256:" + "ab" * 32
    with pytest.raises(DigestMismatch) as e:
        unpack(dest, tmp_path / "out", expected_digest=wrong)
    assert f"expected {wrong}, got {info.digest}" in str(e.value)
    assert leftovers(tmp_path) == []


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.tar.gz"
    f.write_bytes(b"\x1f\x8b\x08\x00" + b"\0" * 100)
    with pytest.raises(ArchiveError, match="not a zstd or xz archive"):
        detect_compression(f)
    with pytest.raises(ArchiveError, match="not a zstd or xz archive"):
        unpack(f, tmp_path / "out")
    assert leftovers(tmp_path, f) == []


# --- failing midway ---------------------------------------------------------------------------


def random_tree(root: Path, mib: int) -> Path:
    root.mkdir()
    for i in range(mib):
        (root / f"r{i}").write_bytes(os.urandom(1 << 20))
    return root


def test_archive_to_a_full_disk(tmp_path: Path, small_tmpfs: Path) -> None:
    src = random_tree(tmp_path / "src", 3)
    dest = small_tmpfs / "big.tar.zst"
    with pytest.raises(ArchiveError, match="No space left on device") as e:
        write_archive(src, dest, source_date_epoch=EPOCH)
    assert "\n" not in str(e.value)
    assert leftovers(small_tmpfs) == []


def test_unpack_to_a_full_disk(tmp_path: Path, small_tmpfs: Path) -> None:
    src = random_tree(tmp_path / "src", 3)
    arch = tmp_path / "big.tar.zst"
    info = write_archive(src, arch, source_date_epoch=EPOCH)
    with pytest.raises(ArchiveError, match="No space left on device"):
        unpack(arch, small_tmpfs / "out", expected_digest=info.digest)
    assert leftovers(small_tmpfs) == []


def test_interrupted_archive_leaves_nothing(tmp_path: Path) -> None:
    src = random_tree(tmp_path / "src", 48)
    out = tmp_path / "out"
    out.mkdir()
    # A shell that starts us in the background leaves SIGINT ignored: Ctrl-C's handler is set here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            write_archive(
                src, out / "slow.tar.xz", source_date_epoch=EPOCH, compression=Compression.XZ, level=9
            )
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert leftovers(out) == []


def test_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a directory"):
        write_archive(tmp_path / "nope", tmp_path / "x.tar.zst", source_date_epoch=EPOCH)
    assert leftovers(tmp_path) == []
