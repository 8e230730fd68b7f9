"""Stage 3: the package cache. Content-addressed by sha256; an entry exists only once its bytes
matched the lock. Downloads run a few at a time, with one progress bar."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from provision.download import download
from provision.errors import ProvisionError
from provision.lock import Lock, LockedKey
from provision.progress import Progress
from provision.spec import expand

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

    def ensure(self, lock: Lock, *, quiet: bool = False, vm: bool = False) -> dict[str, Path]:
        """Make sure every locked package (with vm: the builder machine's too) is cached and
        verified; returns sha256 -> path."""
        pkgs = list(lock.packages) + (list(lock.vm_packages) if vm else [])
        missing = {p.sha256: p for p in pkgs if not self.has(p.sha256)}.values()
        urls = lock.urls() if missing else {}
        if missing:
            total = sum(p.size for p in missing)
            bar = Progress(f"downloading {len(missing)} packages", total,
                           enabled=None if not quiet else False)
            with ThreadPoolExecutor(PARALLEL) as pool:
                futures = [pool.submit(download, lock.package_url(p, urls), self.path(p.sha256),
                                       sha256=p.sha256, size=p.size, progress=bar)
                           for p in missing]
                errors = [f.exception() for f in futures]
            bar.close()
            for e in errors:
                if isinstance(e, ProvisionError):
                    raise e
                if e is not None:
                    raise ProvisionError(f"download failed: {e}")
        return {p.sha256: self.path(p.sha256) for p in pkgs}

    def ensure_key(self, key: LockedKey) -> Path:
        if not self.has(key.sha256):
            url = expand(key.url, f"key of repo {key.repo}")
            download(url, self.path(key.sha256), sha256=key.sha256)
        return self.path(key.sha256)
