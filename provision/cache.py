"""Stage 3: the package cache. Content-addressed by sha256; an entry exists only once its bytes
matched the lock. Downloads run a few at a time, with one progress bar."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from provision.download import download
from provision.errors import ProvisionError
from provision.lock import Lock, LockedKey, LockedPackage
from provision.progress import Progress
from provision.spec import expand

if TYPE_CHECKING:
    from provision.store import Store

PARALLEL = 4


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "provision"


class PackageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def ensure(self, lock: Lock, *, quiet: bool = False, vm: bool = False,
               fallback: Store | None = None) -> dict[str, Path]:
        """Make sure every locked package (with vm: the builder machine's too) is cached and
        verified; returns sha256 -> path. A package the mirror no longer serves (or a mirror
        that is gone) is taken from `fallback`, a store the packages were published to."""
        pkgs = list(lock.packages) + (list(lock.vm_packages) if vm else [])
        missing = {p.sha256: p for p in pkgs if not self.has(p.sha256)}.values()
        urls: dict[str, str] | None = None
        mirror_error: ProvisionError | None = None
        if missing:
            try:
                urls = lock.urls()
            except ProvisionError as e:
                if fallback is None:
                    raise
                mirror_error = e

        def fetch(p: LockedPackage, bar: Progress) -> None:
            err = mirror_error
            if urls is not None:
                try:
                    download(lock.package_url(p, urls), self.path(p.sha256), sha256=p.sha256,
                             size=p.size, progress=bar)
                    return
                except ProvisionError as e:
                    if fallback is None:
                        raise
                    err = e
            assert fallback is not None
            digest = "sha256:" + p.sha256
            if not fallback.has_blob(digest):
                raise ProvisionError(f"{p.name} {p.version}: {err} (and {fallback.url} does not "
                                     "have it either)")
            fallback.get_blob(digest, self.path(p.sha256))
            bar.add(p.size)

        if missing:
            total = sum(p.size for p in missing)
            bar = Progress(f"downloading {len(missing)} packages", total,
                           enabled=None if not quiet else False)
            with ThreadPoolExecutor(PARALLEL) as pool:
                futures = [pool.submit(fetch, p, bar) for p in missing]
                errors = [f.exception() for f in futures]
            bar.close()
            for error in errors:
                if isinstance(error, ProvisionError):
                    raise error
                if error is not None:
                    raise ProvisionError(f"download failed: {error}")
        return {p.sha256: self.path(p.sha256) for p in pkgs}

    def ensure_key(self, key: LockedKey, fallback: Store | None = None) -> Path:
        if not self.has(key.sha256):
            try:
                url = expand(key.url, f"key of repo {key.repo}")
                download(url, self.path(key.sha256), sha256=key.sha256)
            except ProvisionError:
                if fallback is None or not fallback.has_blob("sha256:" + key.sha256):
                    raise
                fallback.get_blob("sha256:" + key.sha256, self.path(key.sha256))
        return self.path(key.sha256)

    def publish(self, lock: Lock, store: Store, *, vm: bool = False) -> int:
        """Put every locked package and key into `store` as blobs (named by their sha256), so
        the environment can be rebuilt when the mirror is gone. Returns how many were new."""
        pkgs = list(lock.packages) + (list(lock.vm_packages) if vm else [])
        blobs = {p.sha256: self.path(p.sha256) for p in pkgs}
        blobs.update({k.sha256: self.ensure_key(k) for k in lock.keys})
        new = 0
        for sha, path in sorted(blobs.items()):
            if not store.has_blob("sha256:" + sha):
                store.put_blob("sha256:" + sha, path)
                new += 1
        return new
