"""Reading a version's small blobs back from a store: its lock, its spec, its SBOM, manifests."""

from __future__ import annotations

from pathlib import Path

from provision.errors import StoreError
from provision.index import Version
from provision.lock import Lock, read_lock
from provision.spec import Spec, load_spec, unpack_spec_bundle
from provision.store import Store

SMALL = 256 << 20


def read_blob(store: Store, digest: str, work: Path) -> bytes:
    """A (small) blob's bytes, verified against its digest."""
    path = work / digest.replace(":", "-")
    if not path.is_file():
        store.get_blob(digest, path)
    if path.stat().st_size > SMALL:
        raise StoreError(f"{digest} is too large to read into memory")
    return path.read_bytes()


def stored_lock(store: Store, version: Version, work: Path) -> Lock:
    path = work / "stored.lock"
    path.write_bytes(read_blob(store, version.lock_digest, work))
    return read_lock(path)


def stored_spec(store: Store, version: Version, work: Path, name: str) -> Spec:
    """The spec a version was built from (published with it since spec bundles exist)."""
    digest = version.artifacts.get("spec")
    if digest is None:
        raise StoreError(f"{name}@{version.digest} was published without its spec (built by an "
                         "older provision): rebuild it from its spec file")
    return load_spec(unpack_spec_bundle(read_blob(store, digest, work), work / "spec"))
