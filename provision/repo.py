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
from provision.lock import Lock, LockedPackage
from provision.spec import Family


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


DEB_DIR = "deb"
RPM_DIR = "rpm"
KEYS_DIR = "keys"


def make_repo_tree(lock: Lock, cache: PackageCache, dest: Path,
                   packages: tuple[LockedPackage, ...], *, family: Family | None = None,
                   suite: str | None = None) -> Path:
    """The repository tree a root is bootstrapped from, by a file:// URL on the host or served
    over HTTP to a builder guest:

        deb/                  a flat apt repository (deb)
        rpm/<origin repo>/    one yum repository per repo of the spec (rpm)
        keys/<sha256>         the locked signing keys (rpm)
    """
    family = family or lock.family
    if family is Family.DEB:
        make_local_repo(cache, dest / DEB_DIR, packages, Family.DEB, suite or lock.suite)
    else:
        for name in sorted({p.repo for p in packages}):
            make_local_repo(cache, dest / RPM_DIR / name,
                            tuple(p for p in packages if p.repo == name), Family.RPM)
        (dest / KEYS_DIR).mkdir(parents=True, exist_ok=True)
        for key in lock.keys:
            _link(cache.ensure_key(key), dest / KEYS_DIR / key.sha256)
    return dest


def make_local_repo(cache: PackageCache, dest: Path, packages: tuple[LockedPackage, ...],
                    family: Family, suite: str | None = None) -> Path:
    """Fill `dest` with the given packages and repository metadata; returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in packages:
        _link(cache.path(p.sha256), dest / p.filename)
    if family is Family.RPM:
        run.run(["createrepo_c", "--quiet", "--no-database", "--simple-md-filenames", dest],
                capture=True)
    else:
        index = run.output(["apt-ftparchive", "packages", "."], cwd=dest)
        (dest / "Packages").write_text(index)
        # mmdebstrap finds the Essential set by suite name: the flat repo must carry it.
        suite = suite or "stable"
        release = run.output(["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={suite}",
                              "-o", f"APT::FTPArchive::Release::Codename={suite}",
                              "release", "."], cwd=dest)
        (dest / "Release").write_text(release)
    return dest
