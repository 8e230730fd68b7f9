"""Stage 4: a local package repository made from the cache and nothing else.

rpm: createrepo_c over hard links to the cached files; deb: a flat apt repository
(apt-ftparchive). The root is bootstrapped from this repository alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from provision import run
from provision.cache import PackageCache
from provision.lock import Lock
from provision.spec import Family


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_local_repo(lock: Lock, cache: PackageCache, dest: Path, repo: str | None = None) -> Path:
    """Fill `dest` with the locked packages (of one origin repo, if given) and repository
    metadata; returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in lock.packages:
        if repo is None or p.repo == repo:
            _link(cache.path(p.sha256), dest / p.filename)
    if lock.family is Family.RPM:
        run.run(["createrepo_c", "--quiet", "--no-database", "--simple-md-filenames", dest],
                capture=True)
    else:
        packages = run.output(["apt-ftparchive", "packages", "."], cwd=dest)
        (dest / "Packages").write_text(packages)
        # mmdebstrap finds the Essential set by suite name: the flat repo must carry it.
        suite = lock.suite or "stable"
        release = run.output(["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={suite}",
                              "-o", f"APT::FTPArchive::Release::Codename={suite}",
                              "release", "."], cwd=dest)
        (dest / "Release").write_text(release)
    return dest
