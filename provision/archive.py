"""Deterministic archives of a root file system tree.

`write_archive` runs GNU tar (pax format, sorted, numeric owners, xattrs, sparse files, clamped
mtimes) and pipes its output through Python - which hashes the tar stream and puts the xattr
records of every pax header in name order - into zstd or xz. The compressed bytes are hashed and
written to a temporary file next to `dest`, fsynced and renamed into place, so `dest` is either
absent, left as it was, or complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from provision.errors import ArchiveError, CommandFailed
from provision.fsutil import fsync_dir
from provision.run import check_returncode, popen, require, stop

log = logging.getLogger("provision.archive")

CHUNK = 1 << 20
BLOCK = 512
ZSTD_DEFAULT_LEVEL = 10
XZ_DEFAULT_LEVEL = 6
# GNU tar's messages and its conversion of file names into pax (UTF-8) records depend on the
# locale; pin it so that the archive bytes do not.
TAR_ENV = {"LC_ALL": "C.UTF-8"}


class Compression(StrEnum):
    ZSTD = "zstd"
    XZ = "xz"


@dataclass(frozen=True)
class ArchiveInfo:
    digest: str  # "sha256:<hex>" of the compressed bytes
    size: int  # compressed size
    tar_sha256: str  # "sha256:<hex>" of the uncompressed tar stream
    tar_size: int
    compression: Compression


def tar_create_argv(root: Path, *, source_date_epoch: int, exclude: Sequence[str] = ()) -> list[str]:
    """The GNU tar command line that writes the deterministic tar stream of `root` to stdout."""
    argv = [
        "tar",
        "--create",
        "--file=-",
        "--format=pax",
        "--sort=name",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--sparse",
        # Sparse formats 0.1 and 1.0 put the PID into a member's header name
        # ("GNUSparseFile.<pid>/..."); 0.0 is the only one whose bytes are reproducible.
        "--sparse-version=0.0",
        f"--mtime=@{source_date_epoch}",
        "--clamp-mtime",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    ]
    if exclude:
        argv += ["--anchored", "--wildcards", "--wildcards-match-slash", "--no-ignore-case"]
        argv += [f"--exclude={_exclude_pattern(p)}" for p in exclude]
    argv += [f"--directory={root}", "."]
    return argv


def _exclude_pattern(pattern: str) -> str:
    """'/usr/share/doc/*' -> './usr/share/doc/*' (member names are './'-prefixed)."""
    if not pattern.startswith("/"):
        raise ArchiveError(f"exclude pattern {pattern!r} is not an absolute in-root path")
    inner = pattern.strip("/")
    if not inner:
        raise ArchiveError(f"exclude pattern {pattern!r} would exclude the whole root")
    return f"./{inner}"


def compressor_argv(compression: Compression, level: int | None, threads: int = 0) -> list[str]:
    """The compressor command line; its output never depends on the number of threads."""
    if threads < 0:
        raise ArchiveError(f"threads must be >= 0, not {threads}")
    if compression is Compression.ZSTD:
        lvl = ZSTD_DEFAULT_LEVEL if level is None else level
        if not 1 <= lvl <= 22:
            raise ArchiveError(f"zstd level must be between 1 and 22, not {lvl}")
        # zstd's multi-threaded mode (-T1 and up, -T0 = one per core) gives the same bytes for
        # every thread count; only --single-thread would differ.
        argv = ["zstd", f"-T{threads}", "-q", "-c", f"-{lvl}"]
        if lvl > 19:
            argv.insert(1, "--ultra")
        return argv
    lvl = XZ_DEFAULT_LEVEL if level is None else level
    if not 0 <= lvl <= 9:
        raise ArchiveError(f"xz level must be between 0 and 9, not {lvl}")
    # Single-threaded: xz's multi-threaded mode writes different (block-split) output, and
    # xz 5.2 falls back to single-threaded mode for -T0 on a one-core machine.
    return ["xz", "-T1", f"-{lvl}", "-q", "-c"]


def write_archive(
    root: Path,
    dest: Path,
    *,
    source_date_epoch: int,
    compression: Compression = Compression.ZSTD,
    exclude: Sequence[str] = (),
    level: int | None = None,
    threads: int = 0,
) -> ArchiveInfo:
    """Archive the tree at `root` into `dest` and describe the result.

    `exclude` holds glob patterns of absolute in-root paths ("/usr/share/doc/*"). `threads` is
    zstd's worker count (0 = one per core); it does not change the output, nor does it apply to
    xz, which always runs single-threaded. Raises ArchiveError; on any failure (also
    KeyboardInterrupt, which is re-raised) the temporary file is removed and `dest` is untouched.
    """
    if source_date_epoch < 0:
        raise ArchiveError(f"source_date_epoch must be >= 0, not {source_date_epoch}")
    if not root.is_dir():
        raise ArchiveError(f"cannot archive {root}: not a directory")
    if not dest.parent.is_dir():
        raise ArchiveError(f"cannot write {dest}: {dest.parent} is not a directory")
    compression = Compression(compression)
    tar_argv = tar_create_argv(root, source_date_epoch=source_date_epoch, exclude=exclude)
    comp_argv = compressor_argv(compression, level, threads)
    require(tar_argv[0])
    require(comp_argv[0])

    try:
        fd, tmpname = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    except OSError as e:
        raise ArchiveError(f"cannot write {dest}: {e.strerror or e}") from e
    tmp = Path(tmpname)
    try:
        with os.fdopen(fd, "wb") as out:
            info = _pipeline(tar_argv, comp_argv, out, compression)
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, ArchiveError):
            raise
        if isinstance(e, CommandFailed):
            raise ArchiveError(f"cannot archive {root}: {e}") from e
        if isinstance(e, OSError):
            raise ArchiveError(f"cannot write {dest}: {e.strerror or e}") from e
        raise
    log.info("wrote %s (%d bytes, tar %d bytes)", dest, info.size, info.tar_size)
    return info


class _Pump(threading.Thread):
    """Copies tar's stdout into the compressor's stdin, normalising and hashing on the way."""

    def __init__(self, src: IO[bytes], dst: IO[bytes]) -> None:
        super().__init__(name="archive-pump", daemon=True)
        self.src = src
        self.dst = dst
        self.sha = hashlib.sha256()
        self.size = 0
        self.normalizer = PaxXattrSorter()
        self.error: BaseException | None = None
        self.broken_pipe = False

    def _put(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.dst.write(data)

    def run(self) -> None:
        try:
            while chunk := self.src.read(CHUNK):
                self._put(self.normalizer.feed(chunk))
            self._put(self.normalizer.finish())
        except BrokenPipeError:
            self.broken_pipe = True  # the compressor died; its exit status says why
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            # Closing tar's stdout makes tar die of SIGPIPE if we stopped early; closing the
            # compressor's stdin lets it finish.
            for f in (self.dst, self.src):
                with contextlib.suppress(OSError):
                    f.close()


def _pipeline(
    tar_argv: list[str], comp_argv: list[str], out: IO[bytes], compression: Compression
) -> ArchiveInfo:
    procs: list[subprocess.Popen[bytes]] = []
    pump: _Pump | None = None
    with tempfile.TemporaryFile() as tar_err, tempfile.TemporaryFile() as comp_err:
        try:
            tar = popen(tar_argv, stdout=subprocess.PIPE, stderr=tar_err, extra_env=TAR_ENV)
            procs.append(tar)
            comp = popen(comp_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=comp_err)
            procs.append(comp)
            assert tar.stdout is not None and comp.stdin is not None and comp.stdout is not None
            pump = _Pump(tar.stdout, comp.stdin)
            pump.start()
            sha = hashlib.sha256()
            size = 0
            while chunk := comp.stdout.read(CHUNK):
                sha.update(chunk)
                out.write(chunk)
                size += len(chunk)
            pump.join()
            if pump.error is not None:
                raise pump.error
            # The compressor first: if it died, tar was killed by SIGPIPE, which says nothing.
            check_returncode(comp, _tail(comp_err))
            check_returncode(tar, tar_error_line(_tail(tar_err)))
            if pump.broken_pipe:
                raise ArchiveError(f"{comp_argv[0]} stopped reading its input")
            if not pump.normalizer.complete:
                raise ArchiveError("tar output ended before the end-of-archive marker")
            return ArchiveInfo(
                digest=f"sha256:{sha.hexdigest()}",
                size=size,
                tar_sha256=f"sha256:{pump.sha.hexdigest()}",
                tar_size=pump.size,
                compression=compression,
            )
        finally:
            stop(procs, pump)


def tar_error_line(stderr: str) -> str:
    """The line of GNU tar's stderr that says what went wrong: the first one, not the
    closing 'Exiting with failure status due to previous errors'."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    causes = [
        ln for ln in lines if "Exiting with failure status" not in ln and "Error is not recoverable" not in ln
    ]
    return (causes or lines or [""])[0]


def _tail(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _header_number(field: bytes) -> int:
    """A ustar numeric field: octal digits, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        n = int.from_bytes(field[1:], "big")
        return -n if field[0] & 0x40 else n
    digits = field.strip(b" \0")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ArchiveError(f"tar wrote a malformed header field {field!r}") from None


_NO_DATA_TYPES = frozenset(b"123456")  # links, devices, directories, fifos: no data blocks
_HEADER, _PAX_DATA, _TRAILER = range(3)


class PaxXattrSorter:
    """A streaming filter over a pax tar stream that sorts the SCHILY.xattr.* records of every
    extended header by attribute name.

    GNU tar writes xattrs in llistxattr() order, which depends on the file system and on the
    order the attributes were set in. Records keep their lengths, so only their order inside
    the header's data changes, and every other byte passes through unchanged.
    """

    def __init__(self) -> None:
        self._state = _HEADER
        self._buf = bytearray()
        self._need = BLOCK
        self._skip = 0
        self._pax_len = 0
        self._pax_type = b"x"
        self._pax_size: int | None = None

    @property
    def complete(self) -> bool:
        """True once the end-of-archive marker went through."""
        return self._state == _TRAILER

    def feed(self, data: bytes) -> bytes:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._state == _TRAILER:
                out.append(view[pos:])
                break
            if self._skip:
                take = min(self._skip, end - pos)
                out.append(view[pos : pos + take])
                pos += take
                self._skip -= take
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                out.append(self._complete())
        return b"".join(out)

    def finish(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _complete(self) -> bytes:
        block = bytes(self._buf)
        self._buf.clear()
        if self._state == _PAX_DATA:
            self._state, self._need = _HEADER, BLOCK
            records, padding = block[: self._pax_len], block[self._pax_len :]
            if self._pax_type == b"x":
                records, self._pax_size = _sort_xattr_records(records)
            return records + padding
        if not any(block):
            self._state = _TRAILER
            return block
        typeflag = block[156:157]
        size = _header_number(block[124:136])
        if typeflag in (b"x", b"g"):
            if size:
                self._state, self._need = _PAX_DATA, _round_up(size)
                self._pax_len, self._pax_type = size, typeflag
            return block
        if self._pax_size is not None:
            size = self._pax_size
            self._pax_size = None
        self._skip = 0 if block[156] in _NO_DATA_TYPES else _round_up(size)
        return block


def _sort_xattr_records(data: bytes) -> tuple[bytes, int | None]:
    """Sort the SCHILY.xattr.* records among themselves; also return the 'size' record."""
    records: list[tuple[bytes, bytes]] = []
    size: int | None = None
    i = 0
    while i < len(data):
        sp = data.find(b" ", i)
        try:
            length = int(data[i:sp])
        except ValueError:
            raise ArchiveError("tar wrote a malformed pax header") from None
        record = data[i : i + length]
        eq = record.find(b"=")
        if sp < 0 or length <= 0 or len(record) != length or eq < 0 or record[-1:] != b"\n":
            raise ArchiveError("tar wrote a malformed pax header")
        key = record[sp - i + 1 : eq]
        if key == b"size":
            size = int(record[eq + 1 : -1])
        records.append((key, record))
        i += length
    slots = [k for k, (key, _) in enumerate(records) if key.startswith(b"SCHILY.xattr.")]
    if len(slots) > 1:
        for k, rec in zip(slots, sorted(records[k] for k in slots), strict=True):
            records[k] = rec
    return b"".join(rec for _, rec in records), size
