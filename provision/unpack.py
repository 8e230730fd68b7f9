"""Safe, atomic extraction of archives written by provision.archive.

`unpack` hashes the archive (when a digest is promised), then streams the decompressed tar
through `tarfile` to refuse hostile members before GNU tar sees a byte, then extracts with GNU
tar into a fresh temporary directory next to `dest` and renames it into place. The archive is
opened once and all three passes read the same open file, so it cannot be swapped in between.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import logging
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Protocol, cast

from provision.archive import TAR_ENV, Compression, tar_error_line
from provision.errors import ArchiveError, CommandFailed, DigestMismatch
from provision.fsutil import fsync_dir
from provision.run import check_returncode, popen, run
from provision.run import stop as stop_pipeline

log = logging.getLogger("provision.unpack")

CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
# After the end-of-archive marker only zero padding may follow (GNU tar pads to its record
# size, 10 KiB by default); more than this is refused rather than read forever.
_MAX_TRAILER = 1 << 20
# tarfile reads ahead by at most one record (10 KiB); keep a little more than that.
_KEEP_TAIL = 64 << 10
_DRAIN_LIMIT = 16 << 20

TAR_EXTRACT_FLAGS = (
    "--xattrs",
    "--xattrs-include=*",
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--sparse",
    "--delay-directory-restore",
)


def _decompress_argv(compression: Compression) -> list[str]:
    if compression is Compression.ZSTD:
        return ["zstd", "-d", "-c", "-q"]
    return ["xz", "-d", "-c", "-q", "--memlimit-decompress=1GiB"]


def detect_compression(path: Path) -> Compression:
    """The compression of the archive at `path`, by its magic bytes."""
    try:
        with path.open("rb", buffering=0) as f:
            return _detect(f, path)
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror or e}") from e


def _detect(f: IO[bytes], label: Path) -> Compression:
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    if magic.startswith(_XZ_MAGIC):
        return Compression.XZ
    raise ArchiveError(f"{label}: not a zstd or xz archive (magic bytes {magic[:6].hex()})")


def check_members(archive: Path) -> int:
    """Refuse an archive with a hostile member, or whose stream is corrupt or truncated.
    Returns the number of members."""
    try:
        with archive.open("rb", buffering=0) as f:
            return _check_stream(f, _detect(f, archive), archive)
    except OSError as e:
        raise ArchiveError(f"cannot read {archive}: {e.strerror or e}") from e


def unpack(archive: Path, dest: Path, *, expected_digest: str | None = None) -> None:
    """Extract `archive` to `dest`, atomically; if `dest` exists already, do nothing.

    Raises DigestMismatch when the archive does not have `expected_digest` ("sha256:<hex>"),
    ArchiveError when it is hostile, corrupt or cannot be extracted; nothing is left behind.
    """
    if os.path.lexists(dest):
        log.debug("%s exists; not unpacking %s", dest, archive)
        return
    try:
        f = archive.open("rb", buffering=0)
    except OSError as e:
        raise ArchiveError(f"cannot read {archive}: {e.strerror or e}") from e
    with f:
        def chunks() -> Iterator[bytes]:
            try:
                while chunk := f.read(CHUNK):
                    yield chunk
            except OSError as e:
                raise ArchiveError(f"cannot read {archive}: {e.strerror or e}") from e

        unpack_stream(chunks(), dest, label=str(archive), expected_digest=expected_digest,
                      length=os.fstat(f.fileno()).st_size)


def unpack_stream(chunks: Iterable[bytes], dest: Path, *, label: str,
                  expected_digest: str | None = None, length: int | None = None) -> None:
    """Extract an archive arriving as `chunks` (a download, a file) to `dest` in one pass:
    hashing, decompressing, checking members and extracting run concurrently, with no copy of
    the archive on disk. Every member is checked before a byte of it reaches tar; tar extracts
    into a temporary directory that is renamed to `dest` only once the whole archive matched
    `expected_digest` (and `length`). Errors as `unpack`."""
    if os.path.lexists(dest):
        log.debug("%s exists; not unpacking %s", dest, label)
        return
    if expected_digest is not None and not expected_digest.startswith("sha256:"):
        raise ArchiveError(f"unsupported digest {expected_digest!r} (expected sha256:<hex>)")
    it = iter(chunks)
    first = b""
    for chunk in it:  # the first bytes say the compression
        first += chunk
        if len(first) >= 6:
            break
    compression = _detect(io.BytesIO(first), Path(label))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise ArchiveError(f"cannot create a directory next to {dest}: {e.strerror or e}") from e
    hashing = _Hashing(itertools.chain([first], it))
    try:
        try:
            count = _stream_extract(hashing, compression, label, tmp)
        except ArchiveError:
            # A corrupt stream is first of all not the blob that was asked for: say so.
            if expected_digest is not None:
                for _ in hashing:
                    pass
                if hashing.digest != expected_digest:
                    raise DigestMismatch(f"{label}: digest mismatch: expected {expected_digest}, "
                                         f"got {hashing.digest}") from None
            raise
        digest, size = hashing.digest, hashing.size
        if length is not None and size != length:
            raise ArchiveError(f"{label}: cut short ({size} of {length} bytes)")
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(f"{label}: digest mismatch: expected {expected_digest}, got {digest}")
        # Make the tree durable before it becomes visible under its final name: a store
        # never looks at a `dest` that exists again.
        run(["sync", "--file-system", tmp], capture=True)
        try:
            os.rename(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not dest.is_dir():
                raise
            log.debug("%s appeared while unpacking; keeping it", dest)
            _remove_tree(tmp)
            return
        fsync_dir(dest.parent)
    except BaseException as e:
        _remove_tree(tmp)
        if isinstance(e, ArchiveError | DigestMismatch):
            raise
        if isinstance(e, CommandFailed):
            raise ArchiveError(f"cannot unpack {label}: {e}") from e
        if isinstance(e, OSError):
            raise ArchiveError(f"cannot unpack {label} to {dest}: {e.strerror or e}") from e
        raise
    log.info("unpacked %s (%d members) to %s", label, count, dest)


class _Hashing:
    """Iterates over chunks, hashing and counting them on the way."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        chunk = next(self._it)
        self._sha.update(chunk)
        self.size += len(chunk)
        return chunk

    @property
    def digest(self) -> str:
        return f"sha256:{self._sha.hexdigest()}"


class Member(Protocol):
    """What the member checks look at: tarfile.TarInfo, or the scanner's own header."""

    name: str
    linkname: str
    type: bytes


@dataclass
class _Header:
    name: str
    linkname: str
    type: bytes
    size: int


_POSIX_MAGIC = b"ustar\x0000"


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, offset: int) -> int:
    """A numeric header field: octal text, or GNU's base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _BadStream(f"corrupt tar header at offset {offset}: bad number field") from None


def _parse_header(raw: bytes, offset: int) -> _Header:
    """The fields of a 512-byte tar header the checks need (as tarfile reads them, but only
    those: this runs once per member on the fetch's critical path)."""
    field = raw[148:156]
    try:
        stored = int(field.split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        raise _BadStream(f"corrupt tar header at offset {offset}: bad checksum field") from None
    unsigned = sum(raw) - sum(field) + 8 * 0x20
    if stored != unsigned:  # some old tars summed signed chars
        signed = sum(struct.unpack_from("148b", raw)) + sum(struct.unpack_from("356b", raw, 156))
        if stored != signed + 8 * 0x20:
            raise _BadStream(f"corrupt tar header at offset {offset}: bad checksum")
    size = _number(raw[124:136], offset)
    kind = raw[156:157]
    name = _nts(raw[0:100])
    if raw[257:265] == _POSIX_MAGIC and kind not in tarfile.GNU_TYPES:
        prefix = _nts(raw[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE
    return _Header(name, _nts(raw[157:257]), kind, size)


def _pax_records(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: `LEN KEY=VALUE\n` ..."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        if space < 0:
            raise _BadStream("malformed pax header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _BadStream("malformed pax header") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise _BadStream("malformed pax header")
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _drain(fd: int, limit: int) -> bool:
    """Read and discard up to `limit` bytes; True if the pipe reached its end."""
    left = limit
    while data := os.read(fd, CHUNK):
        left -= len(data)
        if left <= 0:
            return False
    return True


def _block(n: int) -> int:
    return (n + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


class _Scanner:
    """Reads a decompressed tar stream and passes it on to tar, member by member, only after
    each member's header passed the checks: tar never sees a byte of a hostile member.

    Member data is never parsed or copied in Python beyond one read and one write; only the
    512-byte headers (and pax records) are. Same rules as tarfile: a header's (or its pax
    record's) size says how much data follows, rounded up to 512 bytes."""

    def __init__(self, src: int, sink: int, checker: _MemberChecker) -> None:
        self._src = src
        self._sink = sink
        self._checker = checker
        self._chunks: collections.deque[memoryview] = collections.deque()  # zero-copy views
        self._start = 0  # stream offset of the first buffered byte
        self._len = 0  # bytes buffered
        self.sink_broken = False

    def _fill(self, upto: int) -> bool:
        """Read until the buffer holds stream offsets below `upto` (and no more: member data
        is spliced, not read); False at end of input."""
        while self._start + self._len < upto:
            data = os.read(self._src, CHUNK)
            if not data:
                return False
            self._chunks.append(memoryview(data))
            self._len += len(data)
        return True

    def _pass_on(self, upto: int) -> None:
        """Send everything before stream offset `upto` to tar: what was read (headers), then
        the member data straight from pipe to pipe (splice: it never enters this process)."""
        while self._chunks and self._start < upto:
            chunk = self._chunks[0]
            n = min(len(chunk), upto - self._start)
            view = chunk[:n]
            try:
                while view and not self.sink_broken:
                    view = view[os.write(self._sink, view):]
            except BrokenPipeError:
                self.sink_broken = True  # tar died: its exit status says why
            if n == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[n:]
            self._start += n
            self._len -= n
        while self._start < upto:
            left = upto - self._start
            try:
                if self.sink_broken:
                    moved = len(os.read(self._src, min(left, CHUNK)))
                else:
                    moved = os.splice(self._src, self._sink, min(left, 1 << 30))
            except BrokenPipeError:
                self.sink_broken = True
                continue
            if moved == 0:
                raise _BadStream(f"member data ends early, at offset {self._start}")
            self._start += moved

    def _bytes(self, offset: int, size: int) -> bytes:
        if not self._fill(offset + size):
            raise _BadStream(f"member data ends early, at offset {self._start + self._len}")
        out = bytearray()
        skip = offset - self._start
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            out += chunk[skip:skip + size - len(out)]
            skip = 0
            if len(out) == size:
                break
        return bytes(out)

    def run(self) -> None:
        pos = 0  # where the next header (or pax/longname chain) starts
        while True:
            pax: dict[str, str] = {}
            names: dict[str, str] = {}
            header = pos
            while True:  # extension headers, then the member's own
                if not self._fill(header + tarfile.BLOCKSIZE):
                    if header == self._start + self._len and not pax and not names:
                        raise _BadStream(f"no end-of-archive marker at offset {header}")
                    raise _BadStream(f"truncated header at offset {header}")
                raw = self._bytes(header, tarfile.BLOCKSIZE)
                if raw.count(0) == tarfile.BLOCKSIZE:
                    if pax or names:
                        raise _BadStream(f"extended header without a member at offset {header}")
                    self._end(header)
                    return
                info = _parse_header(raw, header)
                size = int(pax.get("size", info.size))
                if size < 0:
                    raise _BadStream(f"negative size at offset {header}")
                data_at = header + tarfile.BLOCKSIZE
                if info.type == tarfile.XHDTYPE:
                    pax.update(_pax_records(self._bytes(data_at, info.size)))
                elif info.type == tarfile.XGLTYPE:
                    glob = _pax_records(self._bytes(data_at, info.size))
                    if {"path", "linkpath"} & glob.keys():
                        raise self._checker.refuse(info.name, "global pax header sets a path")
                elif info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                    long = self._bytes(data_at, info.size).split(b"\0", 1)[0]
                    key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
                    names[key] = long.decode("utf-8", "surrogateescape")
                else:
                    break
                header = data_at + _block(info.size)
            for key, value in {**names, **pax}.items():
                if key == "path":
                    info.name = value
                elif key == "linkpath":
                    info.linkname = value
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise self._checker.refuse(info.name, "old GNU sparse member (not written by "
                                                      "provision)")
            self._checker.check(info)
            if size and info.type not in tarfile.REGULAR_TYPES:
                raise self._checker.refuse(info.name, f"a {info.type!r} member carries data")
            pos = header + tarfile.BLOCKSIZE + _block(size)
            self._pass_on(pos)  # the member, now checked, and its data

    def _end(self, at: int) -> None:
        """Two zero blocks, then nothing but zero padding: GNU tar would read on past it."""
        while self._fill(self._start + self._len + 1):
            if self._start + self._len - at > _MAX_TRAILER:
                raise _BadStream(f"more than {_MAX_TRAILER} bytes after the end of the archive")
        end = self._start + self._len
        if self._bytes(at, end - at).strip(b"\0"):
            raise _BadStream(f"corrupt tar header or data after offset {at}")
        if end - at < 2 * tarfile.BLOCKSIZE:
            raise _BadStream(f"no end-of-archive marker at offset {at}")
        self._pass_on(end)


def _stream_extract(chunks: Iterable[bytes], compression: Compression, label: str, tmp: Path
                    ) -> int:
    """Extract the compressed stream into `tmp`; returns the member count."""
    tar_argv = ["tar", "--extract", "--file=-", *TAR_EXTRACT_FLAGS, f"--directory={tmp}"]
    feed_error: list[BaseException] = []
    with tempfile.TemporaryFile() as dec_err, tempfile.TemporaryFile() as tar_err:
        dec = popen(_decompress_argv(compression), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=dec_err)
        procs = [dec]
        pump: threading.Thread | None = None
        try:
            tar = popen(tar_argv, stdin=subprocess.PIPE, stderr=tar_err, extra_env=TAR_ENV)
            procs.append(tar)
            assert dec.stdin is not None and dec.stdout is not None and tar.stdin is not None
            dec_in = dec.stdin
            for pipe in (dec.stdin, dec.stdout, tar.stdin):
                with contextlib.suppress(OSError):  # fewer, larger reads and writes
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)

            def feed() -> None:
                try:
                    for chunk in chunks:
                        dec_in.write(chunk)
                except BrokenPipeError:
                    pass  # the decompressor stopped: its status says why
                except BaseException as e:
                    feed_error.append(e)
                finally:
                    with contextlib.suppress(OSError):
                        dec_in.close()

            pump = threading.Thread(target=feed, name="archive feed", daemon=True)
            pump.start()
            checker = _MemberChecker(Path(label))
            scanner = _Scanner(dec.stdout.fileno(), tar.stdin.fileno(), checker)
            try:
                scanner.run()
            except (_BadStream, UnicodeError, ValueError, OSError) as e:
                if feed_error:
                    raise feed_error[0] from None
                # Usually the tar stream broke off because the decompressor failed: let its
                # message win if so.
                ended = _drain(dec.stdout.fileno(), _DRAIN_LIMIT)
                if not ended:
                    dec.kill()
                dec.wait()
                if ended:
                    _raise_decompressor_failure(dec, dec_err, compression, Path(label))
                raise ArchiveError(f"{label}: not a valid tar stream: {e}") from None
            tar.stdin.close()
            pump.join()
            if feed_error:
                raise feed_error[0]
            dec.wait()
            _raise_decompressor_failure(dec, dec_err, compression, Path(label))
            check_returncode(tar, tar_error_line(_text(tar_err)))
            return checker.count
        finally:
            stop_pipeline(procs, pump)


@contextlib.contextmanager
def tar_stream(archive: Path) -> Iterator[tarfile.TarFile]:
    """Read an archive's members in order, decompressing on the fly (nothing on disk). A corrupt
    stream raises ArchiveError."""
    compression = detect_compression(archive)
    with archive.open("rb") as f, tempfile.TemporaryFile() as dec_err:
        dec = popen(_decompress_argv(compression), stdin=f, stdout=subprocess.PIPE, stderr=dec_err)
        try:
            assert dec.stdout is not None
            try:
                with tarfile.open(fileobj=dec.stdout, mode="r|") as tf:
                    yield tf
            except (tarfile.TarError, EOFError, OSError, UnicodeError, ValueError) as e:
                # Usually the stream broke off because the decompressor failed: let its
                # message win if so.
                ended = _drain(dec.stdout.fileno(), _DRAIN_LIMIT)
                if not ended:
                    dec.kill()
                dec.wait()
                if ended:
                    _raise_decompressor_failure(dec, dec_err, compression, archive)
                raise ArchiveError(f"{archive}: not a valid tar stream: {e}") from None
            dec.stdout.close()
            if dec.wait() not in (0, -signal.SIGPIPE):
                _raise_decompressor_failure(dec, dec_err, compression, archive)
        finally:
            stop_pipeline([dec])


class _BadStream(Exception):
    """The decompressed bytes are not a well-formed tar stream (reported as ArchiveError)."""


def _check_stream(f: IO[bytes], compression: Compression, label: Path) -> int:
    f.seek(0)
    dec_argv = _decompress_argv(compression)
    with tempfile.TemporaryFile() as dec_err:
        dec = popen(dec_argv, stdin=f, stdout=subprocess.PIPE, stderr=dec_err)
        try:
            assert dec.stdout is not None
            reader = _TrackingReader(dec.stdout)
            checker = _MemberChecker(label)
            try:
                with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|") as tf:
                    for member in tf:
                        checker.check(member)  # a hostile member raises ArchiveError at once
                    stop = tf.offset
                reader.expect_end_of_archive(stop)
            except (_BadStream, tarfile.TarError, EOFError, OSError, UnicodeError, ValueError) as e:
                # Usually the tar stream broke off because the decompressor failed: let its
                # message win if so.
                if not reader.drain(_DRAIN_LIMIT):
                    dec.kill()
                dec.wait()
                _raise_decompressor_failure(dec, dec_err, compression, label)
                raise ArchiveError(f"{label}: not a valid tar stream: {e}") from None
            dec.wait()  # its output was read to the end
            _raise_decompressor_failure(dec, dec_err, compression, label)
            return checker.count
        finally:
            stop_pipeline([dec])


def _raise_decompressor_failure(
    dec: subprocess.Popen[bytes], err: IO[bytes], compression: Compression, label: Path
) -> None:
    if dec.returncode != 0:
        lines = _text(err).strip().splitlines()
        why = lines[-1] if lines else f"exit code {dec.returncode}"
        raise ArchiveError(f"{label}: corrupt or truncated {compression} stream: {why}")


def _text(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _remove_tree(path: Path) -> None:
    def onerror(func: object, p: str, exc: object) -> None:
        log.warning("cannot remove %s while cleaning up", p)

    shutil.rmtree(path, onerror=onerror)


class _TrackingReader:
    """A read-only file object over a pipe that counts bytes and keeps the last few."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.total = 0
        self._tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.total += len(data)
        self._tail += data
        if len(self._tail) > _KEEP_TAIL:
            del self._tail[: len(self._tail) - _KEEP_TAIL]
        return data

    def drain(self, limit: int) -> bool:
        """Read and discard up to `limit` bytes; True if the pipe reached its end."""
        left = limit
        while data := self._raw.read(min(CHUNK, left)):
            left -= len(data)
            if left <= 0:
                return False
        return True

    def expect_end_of_archive(self, stop: int) -> None:
        """tarfile quietly ends at the first block that is not a valid header, and at the end
        of its input. Require that block to start a real end-of-archive marker (two zero
        blocks) followed by nothing but zero padding: GNU tar would read on past it."""
        consumed = self.total - stop
        if consumed < 0:
            raise _BadStream(f"member data ends early, at offset {self.total}")
        if consumed > len(self._tail):
            raise _BadStream(f"cannot check the tar stream after offset {stop}")
        if consumed and self._tail[len(self._tail) - consumed :].strip(b"\0"):
            raise _BadStream(f"corrupt tar header at offset {stop}")
        zeros = consumed
        while data := self._raw.read(CHUNK):
            zeros += len(data)
            if data.strip(b"\0"):
                raise _BadStream(f"corrupt tar header or data after offset {stop}")
            if zeros > _MAX_TRAILER:
                raise _BadStream(f"more than {_MAX_TRAILER} bytes after the end of the archive")
        if zeros < 2 * tarfile.BLOCKSIZE:
            raise _BadStream(f"no end-of-archive marker at offset {stop}")


class Kind(StrEnum):
    FILE = "regular file"
    DIR = "directory"
    SYMLINK = "symlink"
    CHAR = "character device"
    BLOCK = "block device"
    FIFO = "fifo"


_KINDS: dict[bytes, Kind] = {
    **{t: Kind.FILE for t in tarfile.REGULAR_TYPES},
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split("/") if p not in ("", "."))


class _MemberChecker:
    """Sees the members in archive order and refuses the first hostile one."""

    def __init__(self, label: Path) -> None:
        self.label = label
        self.count = 0
        # What each path is after the members so far (parents tar creates count as dirs).
        self.kinds: dict[tuple[str, ...], Kind] = {}

    def refuse(self, name: str, reason: str) -> ArchiveError:
        return ArchiveError(f"{self.label}: refusing member {name!r}: {reason}")

    def check(self, m: Member) -> None:
        name = m.name
        if "\0" in name or "\0" in m.linkname:
            raise self.refuse(name, "NUL byte in name or link target")
        if name.startswith("/"):
            raise self.refuse(name, "absolute path")
        parts = _parts(name)
        if ".." in parts:
            raise self.refuse(name, "'..' component")
        for i in range(1, len(parts)):
            above = self.kinds.get(parts[:i])
            if above is Kind.SYMLINK:
                raise self.refuse(name, f"path goes through symlink {'/'.join(parts[:i])!r}")
            if above is not None and above is not Kind.DIR:
                raise self.refuse(name, f"parent {'/'.join(parts[:i])!r} is a {above}")
            if above is None:  # tar creates it: a later symlink there would change its type
                self.kinds[parts[:i]] = Kind.DIR
        if m.type == tarfile.LNKTYPE:
            kind = self._hardlink_kind(m, parts)
        elif m.type in _KINDS:
            kind = _KINDS[m.type]
        else:
            raise self.refuse(name, f"unsupported member type {m.type!r}")
        if kind is Kind.SYMLINK and m.type == tarfile.SYMTYPE:
            self._check_symlink(m, parts)
        if not parts and kind is not Kind.DIR:
            raise self.refuse(name, f"the archive root is a {kind}, not a directory")
        before = self.kinds.get(parts)
        if before is not None and before is not kind:
            raise self.refuse(name, f"duplicate name changes type from {before} to {kind}")
        self.kinds[parts] = kind
        self.count += 1

    def _hardlink_kind(self, m: Member, parts: tuple[str, ...]) -> Kind:
        target = m.linkname
        if target.startswith("/"):
            raise self.refuse(m.name, f"hardlink target {target!r} is absolute")
        tparts = _parts(target)
        if ".." in tparts:
            raise self.refuse(m.name, f"hardlink target {target!r} has a '..' component")
        if tparts == parts:
            raise self.refuse(m.name, "hardlink to itself")
        kind = self.kinds.get(tparts)
        if kind is None:
            raise self.refuse(m.name, f"hardlink target {target!r} is not an earlier member")
        if kind is Kind.DIR:
            raise self.refuse(m.name, f"hardlink target {target!r} is a directory")
        # A hardlink to a symlink is a symlink: nothing may be written through it either.
        return kind

    def _check_symlink(self, m: Member, parts: tuple[str, ...]) -> None:
        target = m.linkname
        if not target:
            raise self.refuse(m.name, "empty symlink target")
        if target.startswith("/"):
            return  # resolves inside the root once the tree is a chroot
        depth = len(parts) - 1  # the link's directory, relative to the root
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            depth = depth - 1 if comp == ".." else depth + 1
            if depth < 0:
                raise self.refuse(m.name, f"symlink target {target!r} climbs above the root")
