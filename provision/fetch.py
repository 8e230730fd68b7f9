"""Consumer stage: reference -> verified, unpacked root in a per-digest cache directory.

The root becomes visible (an atomic rename) only after its archive matched its digest and
passed the hostile-member checks; a second fetch of the same digest does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from provision.cache import default_cache_dir
from provision.errors import ProvisionError
from provision.index import Ref
from provision.pin import find_pin, read_pin
from provision.progress import Progress
from provision.store import Store, open_store
from provision.unpack import unpack_stream


@dataclass(frozen=True)
class Fetched:
    name: str
    digest: str
    root: Path
    store: str
    cached: bool


def roots_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "roots"


def root_path(digest: str, cache_dir: Path | None = None) -> Path:
    return roots_dir(cache_dir) / digest.replace(":", "-")


def resolve_target(ref: Ref | None, store_url: str | None, public_key: str | None = None
                   ) -> tuple[Ref, Store]:
    """A reference and its store: given explicitly, or read from the pin file (whose signing
    key, if it pins one, the store's index must be signed by)."""
    if ref is not None:
        return ref, open_store(store_url, public_key=public_key)
    pin_path = find_pin()
    if pin_path is None:
        raise ProvisionError("no environment given and no provision.pin here or above "
                             "(run `provision pin NAME` first)")
    pin = read_pin(pin_path)
    return pin.ref, open_store(store_url or pin.store, public_key=public_key or pin.public_key)


def fetch(ref: Ref, store: Store, *, cache_dir: Path | None = None) -> Fetched:
    _env, version = store.read_index().resolve(ref)
    digest = version.digest
    dest = root_path(digest, cache_dir)
    if dest.is_dir():
        return Fetched(ref.name, digest, dest, store.url, cached=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One pass: download, hash, decompress, check and extract run together; the root appears
    # (a rename) only after the archive matched its digest.
    with store.open_blob(digest) as (chunks, length):
        bar = Progress(f"fetching {ref.name}", length or version.size)

        def counted() -> Iterator[bytes]:
            for chunk in chunks:
                bar.add(len(chunk))
                yield chunk

        try:
            unpack_stream(counted(), dest, label=f"{ref.name}@{digest}", expected_digest=digest,
                          length=length if length is not None else version.size)
        finally:
            bar.close()
    return Fetched(ref.name, digest, dest, store.url, cached=False)


ARTIFACT_NAMES = {"qcow2": "{name}.qcow2", "vagrant": "{name}.box", "ssh-key": "{name}.key",
                  "sbom": "{name}.spdx.json", "spec": "{name}.spec-bundle.json",
                  "sources": "{name}.sources.json", "oci": "{name}.oci.tar"}


def fetch_artifact(ref: Ref, store: Store, kind: str, *, cache_dir: Path | None = None) -> Path:
    """Another output of an environment version (qcow2, vagrant box, ssh-key), verified, in the
    cache; returns its path."""
    _env, version = store.read_index().resolve(ref)
    digest = version.artifacts.get(kind)
    if digest is None:
        have = ", ".join(sorted(version.artifacts)) or "none"
        raise ProvisionError(f"{ref.name}@{version.digest} has no {kind} artifact (has: {have})")
    dest = (cache_dir or default_cache_dir()) / "artifacts" / digest.replace(":", "-") / \
        ARTIFACT_NAMES.get(kind, "{name}").format(name=ref.name)
    if not dest.is_file():
        local = store.local_path(digest)
        label = f"fetching {ref.name} {kind}"
        if local is not None:
            from provision.download import download

            download(local.as_uri(), dest, sha256=digest.split(":", 1)[1], label=label)
        else:
            store.get_blob(digest, dest, label=label)
        if kind == "ssh-key":
            dest.chmod(0o600)
    return dest
