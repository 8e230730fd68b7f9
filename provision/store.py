"""The store: content-addressed blobs plus one index.json.

One interface, several backends: a local directory (the embedded default), the same directory
served read-only by any static HTTP server, and (later) S3. Callers never know which one they hold.

Layout (all backends):
    index.json
    blobs/sha256/<hex>
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

from provision.config import load_config
from provision.download import NotFound, download, fetch_bytes, open_url, read_chunk
from provision.errors import DigestMismatch, ProvisionError, StoreError
from provision.fsutil import file_digest, fsync_dir, write_atomic
from provision.index import DIGEST_RE, Index
from provision.signing import Signer, load_signer, parse_public_key

INDEX = "index.json"


def default_store_url() -> str:
    if os.environ.get("PROVISION_STORE"):
        return os.environ["PROVISION_STORE"]
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return str(Path(base) / "provision" / "store")


def blob_key(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise StoreError(f"{digest!r} is not a sha256 digest")
    return f"blobs/sha256/{digest.split(':', 1)[1]}"


class Store(ABC):
    url: str
    writable: bool = True
    # Consumers: the public key an index must be signed by (None: a signature is checked if
    # present, an unsigned index is accepted). Publishers: the key that signs every index write.
    trusted_key: str | None = None
    signing_key: Path | None = None

    def signer(self) -> Signer | None:
        return load_signer(self.signing_key) if self.signing_key else None

    @abstractmethod
    def has_blob(self, digest: str) -> bool: ...

    @abstractmethod
    def put_blob(self, digest: str, src: Path) -> None:
        """Add a file under its digest (verified); a blob that exists is not written again."""

    @abstractmethod
    def get_blob(self, digest: str, dest: Path, *, label: str | None = None) -> None:
        """Copy a blob to `dest`, verified against its digest; nothing is left on failure."""

    def local_path(self, digest: str) -> Path | None:
        """A path to read the blob in place, for stores on this machine."""
        return None

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[tuple[Iterator[bytes], int | None]]:
        """Stream a blob: yields (chunks, length). Not verified: the reader hashes what it
        reads (as `unpack_stream` does) before trusting it."""
        url = self._blob_url(digest)
        try:
            with open_url(url) as (f, length):
                def chunks() -> Iterator[bytes]:
                    while chunk := read_chunk(f, url):
                        yield chunk

                yield chunks(), length
        except NotFound:
            raise StoreError(f"store {self.url} has no blob {digest}") from None

    def _blob_url(self, digest: str) -> str:
        raise StoreError(f"{self.url} cannot stream blobs")

    @abstractmethod
    def read_index(self) -> Index: ...

    @abstractmethod
    def update_index(self, change: Callable[[Index], Index]) -> Index:
        """Apply `change` to the current index and write it, so that concurrent writers lose
        no update. Returns the index written."""


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _blob(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def has_blob(self, digest: str) -> bool:
        return self._blob(digest).is_file()

    def _blob_url(self, digest: str) -> str:
        return self._blob(digest).as_uri()

    def local_path(self, digest: str) -> Path | None:
        p = self._blob(digest)
        return p if p.is_file() else None

    def put_blob(self, digest: str, src: Path) -> None:
        dest = self._blob(digest)
        if dest.is_file():
            return
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=dest.parent)
        except OSError as e:
            raise StoreError(f"cannot write to store {self.root}: {e.strerror}") from None
        try:
            os.close(fd)
            try:
                os.unlink(tmp)
                os.link(src, tmp)  # same filesystem: no copy
            except OSError:
                shutil.copyfile(src, tmp)
            if file_digest(Path(tmp)) != digest:
                raise DigestMismatch(f"{src} does not have digest {digest}")
            os.chmod(tmp, 0o444)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as e:
            raise StoreError(f"cannot write to store {self.root}: {e.strerror}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_blob(self, digest: str, dest: Path, *, label: str | None = None) -> None:
        src = self._blob(digest)
        if not src.is_file():
            raise StoreError(f"store {self.root} has no blob {digest}")
        download(src.as_uri(), dest, sha256=digest.split(":", 1)[1], label=label)

    def read_index(self) -> Index:
        path = self.root / INDEX
        try:
            return Index.from_json(path.read_bytes(), str(path), self.trusted_key)
        except FileNotFoundError:
            return Index()
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = (self.root / ".index.lock").open("a")
        except OSError as e:
            raise StoreError(f"cannot write to store {self.root}: {e.strerror}") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        signer = self.signer()
        with self._locked():
            new = change(self.read_index())
            path = self.root / INDEX
            try:
                write_atomic(path, new.to_json(signer))
            except OSError as e:
                raise StoreError(f"cannot write {path}: {e.strerror}") from None
            return new


class HttpStore(Store):
    """A store served by any static HTTP server: read-only."""

    writable = False

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/"

    def _url(self, key: str) -> str:
        return urllib.parse.urljoin(self.url, key)

    def _blob_url(self, digest: str) -> str:
        return self._url(blob_key(digest))

    def has_blob(self, digest: str) -> bool:
        try:
            with open_url(self._url(blob_key(digest))):
                return True
        except NotFound:
            return False

    def put_blob(self, digest: str, src: Path) -> None:
        raise StoreError(f"{self.url} is a read-only store (served over HTTP)")

    def get_blob(self, digest: str, dest: Path, *, label: str | None = None) -> None:
        try:
            download(self._url(blob_key(digest)), dest, sha256=digest.split(":", 1)[1], label=label)
        except NotFound:
            raise StoreError(f"store {self.url} has no blob {digest}") from None

    def read_index(self) -> Index:
        url = self._url(INDEX)
        try:
            return Index.from_json(fetch_bytes(url), url, self.trusted_key)
        except NotFound:
            raise StoreError(f"{self.url} is not a store (no {INDEX})") from None

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        raise StoreError(f"{self.url} is a read-only store (served over HTTP)")


def open_store(url: str | None = None, *, public_key: str | None = None,
               signing_key: Path | None = None) -> Store:
    """A store from a URL: a path or file:// (local directory), http(s):// (read-only),
    s3://bucket/prefix. The trusted public key and the signing key default to the config's."""
    url = url or default_store_url()
    parts = urllib.parse.urlsplit(url)
    store: Store
    if parts.scheme in ("http", "https"):
        store = HttpStore(url)
    elif parts.scheme == "s3":
        from provision.s3 import S3Store

        store = S3Store(url)
    elif parts.scheme == "file":
        store = LocalStore(Path(urllib.parse.unquote(parts.path)))
    elif parts.scheme == "":
        store = LocalStore(Path(url).expanduser().absolute())
    else:
        raise ProvisionError(f"unsupported store URL {url!r} "
                             "(use a path, file://, http://, https:// or s3://)")
    config = load_config()
    store.trusted_key = parse_public_key(public_key) if public_key else config.trusted_key(url)
    store.signing_key = signing_key or config.signing_key
    return store
