"""Vagrant box catalogs: one JSON file per environment, `vagrant/<name>.json` in the store.

The file is Vagrant's box metadata format, so `config.vm.box_url` (or `vagrant box add URL`) can
name it and `vagrant box update` finds new versions:

    {"name": "bookworm-build", "description": "...",
     "versions": [{"version": "0.1732610000", "provision_digest": "sha256:...",
                   "providers": [{"name": "libvirt", "url": "file:///.../blobs/sha256/<hex>",
                                  "checksum_type": "sha256", "checksum": "<hex>"}]}]}

Boxes themselves are ordinary blobs of the store. Vagrant does not resolve relative URLs, so each
box URL is absolute: `file://` for a store on this machine, or the `http(s)://` URL the same store
directory is served at (`base_url`). Versions are dotted numbers only (Vagrant compares them as
RubyGems versions; a letter would make a pre-release); by default `0.<unix time of publishing>`.
`provision_digest` (ignored by Vagrant) names the environment a box was made of, so a pin can
select its box; the top-level Vagrantfile also accepts the box's own digest in a pin.

A catalog is rewritten atomically (temp file, fsync, rename) under a lock, adding to the versions
it has: published versions are never changed or dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.box import BoxInfo
from provision.errors import ProvisionError, StoreError
from provision.fsutil import write_atomic
from provision.index import DIGEST_RE
from provision.store import LocalStore, Store

CATALOG_DIR = "vagrant"
PROVIDER = "libvirt"
VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,19})(\.(0|[1-9][0-9]{0,19})){0,3}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # an environment name (see provision.index)
HEX_RE = re.compile(r"[0-9a-f]{64}")


class CatalogError(ProvisionError):
    """A Vagrant catalog is malformed, or a change to it is refused."""


@dataclass(frozen=True)
class BoxVersion:
    """One version of a box in a catalog."""

    version: str
    url: str
    sha256: str  # hex digest of the box file
    provision_digest: str | None = None  # sha256:<hex> of the environment it was made of

    def check(self) -> None:
        if not VERSION_RE.fullmatch(self.version):
            raise CatalogError(f"box version {self.version!r} is not dotted numbers (like 0.1732610000)")
        if not HEX_RE.fullmatch(self.sha256):
            raise CatalogError(f"box checksum {self.sha256!r} is not a sha256 hex digest")
        if not re.match(r"^(file|https?)://", self.url):
            raise CatalogError(f"box URL {self.url!r} is not file://, http:// or https://")
        if self.provision_digest is not None and not DIGEST_RE.match(self.provision_digest):
            raise CatalogError(f"environment digest {self.provision_digest!r} is not sha256:<hex>")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "providers": [{"name": PROVIDER, "url": self.url, "checksum_type": "sha256",
                           "checksum": self.sha256}],
        }
        if self.provision_digest is not None:
            d["provision_digest"] = self.provision_digest
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BoxVersion:
        provider = next(p for p in d["providers"] if p["name"] == PROVIDER)
        if provider.get("checksum_type", "sha256") != "sha256":
            raise CatalogError(f"version {d['version']}: checksum type {provider['checksum_type']!r}")
        return cls(version=str(d["version"]), url=str(provider["url"]), sha256=str(provider["checksum"]),
                   provision_digest=d.get("provision_digest"))


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def version_for(created: float | None = None) -> str:
    """The default version of a box published at `created` (unix time; now if None)."""
    return f"0.{int(time.time() if created is None else created)}"


def catalog_key(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise CatalogError(f"{name!r} is not an environment name")
    return f"{CATALOG_DIR}/{name}.json"


def catalog_url(store_url: str, name: str) -> str:
    """Where a store's catalog for `name` is, as a URL Vagrant takes (a path becomes file://)."""
    if re.match(r"^(https?|file)://", store_url):
        return store_url.rstrip("/") + "/" + catalog_key(name)
    return (Path(store_url).expanduser().absolute() / catalog_key(name)).as_uri()


def box_url(base_url: str, sha256: str) -> str:
    """The URL of a box stored as a blob of the store at `base_url`."""
    return base_url.rstrip("/") + f"/blobs/sha256/{sha256}"


def catalog_for(name: str, versions: Iterable[BoxVersion | tuple[str, str, str]], *,
                description: str | None = None) -> dict[str, Any]:
    """A Vagrant catalog of `name`, versions (version, box URL, sha256 hex) sorted oldest first."""
    catalog_key(name)
    items = [v if isinstance(v, BoxVersion) else BoxVersion(*v) for v in versions]
    seen: dict[str, BoxVersion] = {}
    for v in items:
        v.check()
        if v.version in seen and seen[v.version] != v:
            raise CatalogError(f"{name} version {v.version} is given twice, differently")
        seen[v.version] = v
    catalog: dict[str, Any] = {"name": name}
    if description is not None:
        catalog["description"] = description
    catalog["versions"] = [seen[k].to_dict() for k in sorted(seen, key=version_key)]
    return catalog


def parse_catalog(text: str | bytes, where: str) -> tuple[str, str | None, list[BoxVersion]]:
    """(name, description, versions) of a catalog; CatalogError if it is not one of ours."""
    try:
        data = json.loads(text)
        versions = [BoxVersion.from_dict(v) for v in data["versions"]]
        name, description = str(data["name"]), data.get("description")
    except CatalogError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
        raise CatalogError(f"{where}: not a Vagrant catalog with {PROVIDER} boxes ({e!r})") from None
    for v in versions:
        v.check()
    return name, description, versions


def read_catalog(store: Store, name: str) -> dict[str, Any] | None:
    """The catalog of `name` in a local store, or None if there is none yet."""
    found = _read(_catalog_path(store, name))
    if found is None:
        return None
    return catalog_for(found[0], found[2], description=found[1])


def catalog_versions(store: Store, name: str) -> list[BoxVersion]:
    """The versions in the catalog of `name` in a local store, oldest first."""
    found = _read(_catalog_path(store, name))
    return sorted(found[2], key=lambda v: version_key(v.version)) if found else []


def _read(path: Path) -> tuple[str, str | None, list[BoxVersion]] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    return parse_catalog(text, str(path))


def write_catalog(store: Store, name: str, versions: Sequence[BoxVersion | tuple[str, str, str]], *,
                  description: str | None = None) -> dict[str, Any]:
    """Add `versions` to the catalog of `name` in a local store and write it atomically.

    A version already there with the same box is kept as it is; one with a different box is
    refused (Vagrant caches boxes by name and version: a changed version would never be fetched).
    The description is replaced when one is given. Returns the catalog written.
    """
    path = _catalog_path(store, name)
    with _locked(path.parent):
        old_description: str | None = None
        old: list[BoxVersion] = []
        found = _read(path)
        if found is not None:
            old_name, old_description, old = found
            if old_name != name:
                raise CatalogError(f"{path} is the catalog of {old_name!r}, not of {name!r}")
        have = {v.version: v for v in old}
        new = [v if isinstance(v, BoxVersion) else BoxVersion(*v) for v in versions]
        for v in new:
            if v.version in have and have[v.version] != v:
                raise CatalogError(f"{name} version {v.version} is already published with another box")
        catalog = catalog_for(name, [*old, *new],
                              description=description if description is not None else old_description)
        _write_atomic(path, json.dumps(catalog, indent=1) + "\n")
    return catalog


def publish_box(store: Store, name: str, box: BoxInfo, *, version: str | None = None,
                base_url: str | None = None, provision_digest: str | None = None,
                description: str | None = None) -> BoxVersion:
    """Put `box` in a local store as a blob and add it to the catalog of `name`.

    `base_url` is the URL the store is served at (default: its file:// URL). Returns the version
    added (or, if the same box was published before, the version it has).
    """
    if not isinstance(store, LocalStore):
        raise CatalogError(f"{store.url} is a read-only store: publish into its directory")
    store.put_blob(box.digest, box.path)
    base = base_url if base_url is not None else store.root.absolute().as_uri()
    url = box_url(base, box.sha256)
    if version is None:
        for v in catalog_versions(store, name):
            if v.sha256 == box.sha256 and v.url == url and v.provision_digest == provision_digest:
                return v
    entry = BoxVersion(version or version_for(), url, box.sha256, provision_digest)
    write_catalog(store, name, [entry], description=description)
    return entry


def _catalog_path(store: Store, name: str) -> Path:
    if not isinstance(store, LocalStore):
        raise CatalogError(f"{store.url} is not a store on this machine: write its catalog where it is kept")
    return store.root / catalog_key(name)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = (directory / ".lock").open("a")
    except OSError as e:
        raise StoreError(f"cannot write to {directory}: {e.strerror}") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_atomic(path: Path, text: str) -> None:
    try:
        write_atomic(path, text)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
