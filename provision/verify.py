"""Trust, but verify: check what a store serves, and rebuild an environment from its lock.

`verify REF` checks every blob of a version against its digest. `verify REF --rebuild` builds
the environment again from the spec and lock published with it (packages from the mirror, or
from the store when the mirror no longer has them) and compares digests; on a mismatch it says
which files differ and how (content, mode, owner, mtime, xattrs, type, link target), read from
the two archives.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from provision import run
from provision.build import build
from provision.errors import ProvisionError
from provision.index import Ref, Version
from provision.publish import version_blobs
from provision.store import LocalStore, Store
from provision.stored import stored_lock, stored_spec
from provision.unpack import tar_stream


class VerifyError(ProvisionError):
    """A version did not verify; `problems` has one line per difference."""

    def __init__(self, message: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(message)


@dataclass(frozen=True)
class Entry:
    type: str
    mode: str
    owner: str
    mtime: int
    size: int
    content: str  # sha256 of a regular file's bytes
    link: str
    xattrs: tuple[tuple[str, str], ...]
    device: str


TYPES = {b"0": "file", b"\0": "file", b"1": "hardlink", b"2": "symlink", b"3": "char device",
         b"4": "block device", b"5": "directory", b"6": "fifo", b"7": "file"}


def archive_entries(archive: Path) -> dict[str, Entry]:
    """Every member of an archive, by path (`/etc/passwd`), with what identifies it."""
    out: dict[str, Entry] = {}
    with tar_stream(archive) as tf:
        for m in tf:
            content = ""
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                content = h.hexdigest()
            xattrs = tuple(sorted((k.removeprefix("SCHILY.xattr."), hashlib.sha256(
                v.encode("utf-8", "surrogateescape")).hexdigest()[:16])
                for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")))
            name = "/" + m.name.removeprefix("./").rstrip("/")
            out[name if name != "/." else "/"] = Entry(
                type=TYPES.get(m.type, repr(m.type)), mode=f"{m.mode:04o}",
                owner=f"{m.uid}:{m.gid}", mtime=int(m.mtime), size=m.size if m.isfile() else 0,
                content=content, link=m.linkname, xattrs=xattrs,
                device=f"{m.devmajor},{m.devminor}" if m.ischr() or m.isblk() else "")
    return out


def diff_archives(a: Path, b: Path, *, a_name: str = "published", b_name: str = "rebuilt"
                  ) -> list[str]:
    """One line per difference: `PATH: what (a -> b)`."""
    ea, eb = archive_entries(a), archive_entries(b)
    lines: list[str] = []
    for path in sorted(ea.keys() | eb.keys()):
        x, y = ea.get(path), eb.get(path)
        if x is None:
            lines.append(f"{path}: only in the {b_name} archive")
        elif y is None:
            lines.append(f"{path}: only in the {a_name} archive")
        elif x != y:
            what = []
            for f in fields(Entry):
                u, v = getattr(x, f.name), getattr(y, f.name)
                if u != v:
                    if f.name == "content":
                        what.append(f"content (sha256 {u[:12]} -> {v[:12]})")
                    elif f.name == "xattrs":
                        names = sorted({k for k, _ in u} ^ {k for k, _ in v}
                                       | {k for k, h in u if (k, h) not in v})
                        what.append(f"xattr {', '.join(names)}")
                    elif f.name != "size":
                        what.append(f"{f.name} ({u} -> {v})")
            lines.append(f"{path}: {'; '.join(what)}")
    return lines


@dataclass(frozen=True)
class Verified:
    name: str
    digest: str
    blobs: int
    rebuilt: str | None  # the digest of the rebuild, when asked for


def _check_blobs(store: Store, version: Version, work: Path) -> int:
    count = 0
    for what, digest in version_blobs(store, version, work):
        local = store.local_path(digest)
        if local is not None:
            from provision.fsutil import file_digest

            if file_digest(local) != digest:
                raise VerifyError(f"{what} blob {digest} does not match its digest", [])
        else:
            tmp = work / "blob"
            store.get_blob(digest, tmp)
            tmp.unlink()
        count += 1
    return count


def verify(ref: Ref, store: Store, *, rebuild: bool = False, cache_dir: Path | None = None,
           diffoscope: bool = False) -> Verified:
    _env, version = store.read_index().resolve(ref)
    with tempfile.TemporaryDirectory(prefix="provision-verify-") as tmp:
        work = Path(tmp)
        count = _check_blobs(store, version, work)
        if not rebuild:
            return Verified(ref.name, version.digest, count, None)
        spec = stored_spec(store, version, work, ref.name)
        lock = stored_lock(store, version, work)
        print(f"provision: rebuilding {ref.name} from its lock ({len(lock.packages)} packages)",
              file=sys.stderr)
        scratch_store = LocalStore(work / "rebuilt")
        result = build(spec, scratch_store, cache_dir=cache_dir, fallback=store, lock=lock,
                       tags=())
        rebuilt = result.version.digest
        if rebuilt == version.digest:
            return Verified(ref.name, version.digest, count, rebuilt)
        published = work / "published"
        local = store.local_path(version.digest)
        if local is not None:
            shutil.copyfile(local, published)
        else:
            store.get_blob(version.digest, published)
        mine = scratch_store.local_path(rebuilt)
        assert mine is not None
        problems = diff_archives(published, mine)
        if diffoscope:
            if shutil.which("diffoscope") is None:
                problems.append("(diffoscope is not installed: apt-get install diffoscope)")
            else:
                proc = run.run(["diffoscope", "--text", str(work / "diffoscope.txt"),
                                str(published), str(mine)], check=False, capture=True)
                if proc.returncode in (0, 1):
                    problems.append(f"diffoscope: {work / 'diffoscope.txt'} (kept below)")
                    problems += (work / "diffoscope.txt").read_text(errors="replace").splitlines()
        raise VerifyError(f"{ref.name}: the rebuild is {rebuilt}, not the published "
                          f"{version.digest} ({len(problems)} differences)", problems)


def iter_lines(problems: list[str], limit: int = 200) -> Iterator[str]:
    yield from problems[:limit]
    if len(problems) > limit:
        yield f"... and {len(problems) - limit} more"
