"""Build a file system tree with every feature a Debian root has, and describe trees exactly."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

from provision.run import run

OLD_MTIME = 1_000_000_000  # 2001: older than any epoch the tests use
NEW_MTIME = 2_000_000_000  # 2033: newer than any epoch the tests use
SPARSE_SIZE = 64 << 20
SPARSE_DATA = ((4096, b"A" * 4096), (48 << 20, b"B" * 8192))  # (offset, bytes)
SPARSE_FILE = "var/lib/sparse.img"
HARDLINKS = ("usr/lib/hl-a", "usr/lib/hl-b")
# A name that is not UTF-8 and one that is, to pin down how names are encoded.
BAD_NAME = os.fsdecode(b"usr/share/bad-\xff-name")
UTF8_NAME = "usr/share/na\u00efve caf\u00e9.txt"
LONG_NAME = "usr/share/" + "/".join(["d" * 40] * 4) + "/" + "f" * 120


class Entry(NamedTuple):
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    rdev: int
    xattrs: tuple[tuple[str, bytes], ...]
    target: str | None
    sha256: str | None
    hardlinks: tuple[str, ...]
    data_map: tuple[tuple[int, int], ...]


def _file(root: Path, rel: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)  # after chown, which clears set-id bits
    return p


def _dir(root: Path, rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    return p


def make_feature_tree(root: Path) -> None:
    """Populate `root` (an existing, empty directory) with files of every kind and attribute."""
    os.chmod(root, 0o755)
    _dir(root, "etc")
    _file(root, "etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640, 0, 42)
    _file(root, "etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")
    _dir(root, "home/user", 0o750, 1000, 1000)
    _file(root, "home/user/notes.txt", b"mine\n", 0o600, 1000, 1000)
    _file(root, "home/user/shared.txt", b"ours\n", 0o664, 1000, 100)

    ping = _file(root, "usr/bin/ping", b"\x7fELF not really\n", 0o755)
    run(["/usr/sbin/setcap", "cap_net_raw+ep", ping], capture=True)
    _file(root, "usr/bin/su", b"setuid\n", 0o4755)
    _file(root, "usr/bin/wall", b"setgid\n", 0o2755, 0, 5)
    os.symlink("ping", root / "usr/bin/ping6")  # relative
    _dir(root, "etc/alternatives")
    os.symlink("/usr/bin/ping", root / "etc/alternatives/ping")  # absolute
    os.symlink("../../home/user/notes.txt", root / "usr/bin/notes")
    os.chown(root / "usr/bin/notes", 1000, 1000, follow_symlinks=False)

    a = _file(root, HARDLINKS[0], b"linked twice\n", 0o644)
    os.link(a, root / HARDLINKS[1])

    x = _file(root, "srv/xattr.txt", b"with attributes\n")
    # Deliberately not in name order: tar writes them in listxattr() order.
    os.setxattr(x, "user.demo", b"hello")
    os.setxattr(x, "user.another", b"\x00binary\xff")
    os.setxattr(root / "srv", "user.dir", b"on a directory")
    _dir(root, "srv/empty")

    _dir(root, "tmp", 0o1777)
    _dir(root, "var/tmp", 0o1777)
    _dir(root, "dev")
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chown(root / "dev/loop0", 0, 6)
    os.chmod(root / "dev/loop0", 0o660)
    _dir(root, "run")
    os.mkfifo(root / "run/initctl", 0o600)
    os.chmod(root / "run/initctl", 0o600)

    sparse = root / SPARSE_FILE
    sparse.parent.mkdir(parents=True, exist_ok=True)
    with sparse.open("wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, data in SPARSE_DATA:
            f.seek(offset)
            f.write(data)

    _file(root, "usr/share/doc/pkg/copyright", b"MPL-2.0\n")
    _file(root, "usr/share/doc/pkg/changelog.gz", b"\x1f\x8b not really\n")
    _file(root, "var/cache/apt/archives/pkg.deb", b"!<arch>\n")
    _file(root, "var/cache/debconf/config.dat", b"Name: x\n")
    _file(root, BAD_NAME, b"not utf-8\n")
    _file(root, UTF8_NAME, b"utf-8\n")
    _file(root, LONG_NAME, b"long\n")
    _file(root, "usr/share/empty-file", b"")

    # Times last, children before their directories. A few are newer than any test epoch.
    newer = {"etc/passwd", "usr/bin/su", "tmp", "usr/bin/ping6", "srv/empty", HARDLINKS[0]}
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames, None]:
            p = Path(dirpath) if name is None else Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            t = NEW_MTIME if rel in newer else OLD_MTIME
            if rel == "etc/shadow":
                os.utime(p, ns=(OLD_MTIME * 10**9 + 123_456_789,) * 2, follow_symlinks=False)
            else:
                os.utime(p, (t, t), follow_symlinks=False)


def data_map(path: Path) -> tuple[tuple[int, int], ...]:
    """The (start, end) ranges of a file that hold data; the rest are holes."""
    ranges: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, pos))
    finally:
        os.close(fd)
    return tuple(ranges)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def snapshot(root: Path) -> dict[str, Entry]:
    """Everything an archive must preserve, per path relative to `root` ("." is the root)."""
    stats: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *dirnames, *filenames]:
            p = Path(dirpath) if name is None else Path(dirpath, name)
            stats[p.relative_to(root).as_posix()] = p.lstat()
    inodes: dict[tuple[int, int], list[str]] = {}
    for rel, st in stats.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)

    snap: dict[str, Entry] = {}
    for rel, st in stats.items():
        p = root / rel
        kind = _TYPES[stat.S_IFMT(st.st_mode)]
        names = sorted(os.listxattr(p, follow_symlinks=False))
        xattrs = tuple((n, os.getxattr(p, n, follow_symlinks=False)) for n in names)
        regular = kind == "file"
        snap[rel] = Entry(
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=0 if kind == "dir" else st.st_size,
            mtime=int(st.st_mtime),
            rdev=st.st_rdev if kind in ("char", "block") else 0,
            xattrs=xattrs,
            target=os.readlink(p) if kind == "symlink" else None,
            sha256=_sha256(p) if regular else None,
            hardlinks=tuple(sorted(inodes.get((st.st_dev, st.st_ino), []))),
            data_map=data_map(p) if regular else (),
        )
    return snap
