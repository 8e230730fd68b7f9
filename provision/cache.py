"""Stage 3: the package cache. Content-addressed by sha256; an entry exists only once its bytes
matched the lock. Downloads run a few at a time, with one progress bar."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from provision.download import download
from provision.errors import ProvisionError
from provision.lock import LockedKey, LockedPackage
from provision.progress import Progress

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

    def ensure(self, packages: Iterable[LockedPackage], *, quiet: bool = False) -> dict[str, Path]:
        """Make sure every package is cached and verified; returns sha256 -> path."""
        pkgs = list(packages)
        missing = {p.sha256: p for p in pkgs if not self.has(p.sha256)}.values()
        if missing:
            total = sum(p.size for p in missing)
            bar = Progress(f"downloading {len(missing)} packages", total,
                           enabled=None if not quiet else False)
            with ThreadPoolExecutor(PARALLEL) as pool:
                futures = [pool.submit(self._fetch, p, bar) for p in missing]
                errors = [f.exception() for f in futures]
            bar.close()
            for e in errors:
                if isinstance(e, ProvisionError):
                    raise e
                if e is not None:
                    raise ProvisionError(f"download failed: {e}")
        return {p.sha256: self.path(p.sha256) for p in pkgs}

    def _fetch(self, p: LockedPackage, bar: Progress) -> None:
        download(p.url, self.path(p.sha256), sha256=p.sha256, size=p.size, progress=bar)

    def ensure_key(self, key: LockedKey) -> Path:
        if not self.has(key.sha256):
            download(key.url, self.path(key.sha256), sha256=key.sha256)
        return self.path(key.sha256)
