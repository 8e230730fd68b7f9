"""Fetch bytes from http(s):// or file:// URLs into files, verified and atomic.

A download lands in a temporary file beside its destination and is renamed into place only after
its sha256 matched; on any failure the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from provision.errors import DigestMismatch, MirrorUnreachable, ProvisionError
from provision.progress import Progress

CHUNK = 1 << 20
TIMEOUT = 30


class NotFound(ProvisionError):
    """The URL answered, but has nothing at that path."""


def _host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


@contextlib.contextmanager
def open_url(url: str, timeout: float = TIMEOUT) -> Iterator[tuple[BinaryIO, int | None]]:
    """Open a URL for reading; yields (stream, length or None). Maps failures to one-line errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parts.path))
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"not found: {url}") from None
        except OSError as e:
            raise ProvisionError(f"cannot read {path}: {e.strerror}") from None
        with f:
            yield f, os.fstat(f.fileno()).st_size
        return
    if parts.scheme not in ("http", "https"):
        raise ProvisionError(f"unsupported URL scheme in {url!r} (use http, https or file)")
    req = urllib.request.Request(url, headers={"User-Agent": "provision/0.1"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise NotFound(f"not found: {url} (HTTP {e.code})") from None
        raise MirrorUnreachable(f"{_host(url)} answered HTTP {e.code} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MirrorUnreachable(f"mirror unreachable: {_host(url)} ({reason})") from None
    with resp:
        length = resp.headers.get("Content-Length")
        yield resp, int(length) if length and length.isdigit() else None


def read_chunk(src: BinaryIO, url: str) -> bytes:
    try:
        return src.read(CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise MirrorUnreachable(f"download of {url} failed: {e}") from None


def fetch_bytes(url: str, limit: int = 64 << 20) -> bytes:
    with open_url(url) as (f, _):
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ProvisionError(f"{url} is larger than {limit} bytes")
    return data


def download(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
             progress: Progress | None = None, label: str | None = None) -> str:
    """Download `url` to `dest` atomically; verify sha256 (hex) if given; return the hex digest.

    Nothing is left at `dest` (nor a temp file) unless the whole download verified.
    """
    with open_url(url) as (src, length):
        def chunks() -> Iterator[bytes]:
            while chunk := read_chunk(src, url):
                yield chunk

        return save_stream(chunks(), dest, what=url, sha256=sha256, size=size, length=length,
                           progress=progress, label=label)


def save_stream(chunks: Iterable[bytes], dest: Path, *, what: str, sha256: str | None = None,
                size: int | None = None, length: int | None = None,
                progress: Progress | None = None, label: str | None = None) -> str:
    """Write `chunks` to `dest` atomically, verified like `download`; return the hex digest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    own_bar = progress is None and label is not None
    try:
        with os.fdopen(fd, "wb") as out:
            bar = progress or (Progress(label, size or length) if label else None)
            for chunk in chunks:
                h.update(chunk)
                out.write(chunk)
                if bar is not None:
                    bar.add(len(chunk))
            if own_bar and bar is not None:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
            got = out.tell()
        if length is not None and got != length:
            raise ProvisionError(f"download of {what} was cut short ({got} of {length} bytes)")
        if size is not None and got != size:
            raise DigestMismatch(f"{what}: expected {size} bytes, got {got}")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise DigestMismatch(f"{what}: expected sha256:{sha256}, got sha256:{digest}")
        os.rename(tmp, dest)
        return digest
    except OSError as e:
        raise ProvisionError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def probe(url: str) -> None:
    """Raise MirrorUnreachable unless the URL answers (any HTTP answer but a connection error)."""
    try:
        with open_url(url, timeout=15) as (f, _):
            f.read(1)
    except NotFound:
        return
