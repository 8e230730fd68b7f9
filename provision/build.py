"""The build pipeline: spec -> lock -> cache -> local repo -> rootfs -> archive -> store + index.

As `docker build` adds to the local images, `build` adds the environment to a store.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from provision.archive import Compression, write_archive
from provision.cache import PackageCache, default_cache_dir
from provision.errors import LockError, StoreError
from provision.fsutil import file_digest
from provision.gate import enforce, scan_tree
from provision.index import Index, Version
from provision.lock import Lock, check_forbidden, lock_spec, read_lock
from provision.rootfs import BuildError, bootstrap, scratch
from provision.sbom import make_sbom
from provision.spec import Output, Spec, spec_bundle
from provision.store import LocalStore, Store


@dataclass(frozen=True)
class BuildResult:
    name: str
    version: Version
    store: str
    lock_path: Path


def ensure_lock(spec: Spec, *, relock: bool = False) -> Lock:
    """The spec's lock: made if missing, refused if stale (unless relock)."""
    path = spec.lock_path
    if relock or not path.exists():
        if not relock:
            print(f"provision: no lock yet; resolving {path}", file=sys.stderr)
        return lock_spec(spec)
    lock = read_lock(path)
    if not lock.matches(spec):
        raise LockError(f"{path} no longer matches {spec.path} (run with --relock to update it)")
    for w in spec.warnings:
        print(f"provision: warning: {w}", file=sys.stderr)
    check_forbidden(spec, [p.name for p in lock.packages])
    return lock


def build(spec: Spec, store: Store, *, relock: bool = False, cache_dir: Path | None = None,
          keep_root: Path | None = None, tags: tuple[str, ...] = ("latest",),
          accelerator: str | None = None, fallback: Store | None = None,
          lock: Lock | None = None) -> BuildResult:
    """Build `spec` into `store`. `lock` builds from a given lock (a rebuild) instead of the
    spec's lock file; `fallback` is a store to take packages from when the mirror lacks them.

    Nothing goes into the store before the publish gate passed on the built root; the index is
    written last."""
    if not store.writable:
        raise StoreError(f"{store.url} is a read-only store: build into a local one, then publish")
    if lock is None:
        lock = ensure_lock(spec, relock=relock)
    cache_root = cache_dir or default_cache_dir()
    cache = PackageCache(cache_root / "packages")
    wants_vm = any(o is not Output.CHROOT for o in spec.outputs)
    if wants_vm and not lock.vm_packages:
        raise LockError(f"{spec.lock_path} has no builder packages (run with --relock)")
    cache.ensure(lock, vm=wants_vm, fallback=fallback)
    for key in lock.keys:
        cache.ensure_key(key, fallback)
    artifacts: dict[str, str] = {}
    with scratch(cache_root / "work") as work:
        root = work / "root"
        bootstrap(spec, lock, cache, root, work)
        enforce(scan_tree(root, forbidden=spec.forbidden, allow=spec.allow, exclude=spec.exclude),
                spec.name)
        archive = work / "archive"
        info = write_archive(root, archive, source_date_epoch=lock.source_date_epoch,
                             compression=Compression(spec.compression), exclude=spec.exclude)
        blobs: dict[str, Path] = {}
        for kind, data in (("lock", lock.to_json().encode()),
                           ("spec", spec_bundle(spec)),
                           ("sbom", make_sbom(root, lock, name=spec.name, digest=info.digest))):
            path = work / kind
            path.write_bytes(data)
            digest = file_digest(path)
            blobs[digest] = path
            if kind != "lock":
                artifacts[kind] = digest
        if keep_root is not None:
            os.rename(root, keep_root)
        else:
            shutil.rmtree(root)
        if wants_vm:
            from provision.vmbuild import build_vm

            vm = build_vm(spec, lock, cache, work, accelerator=accelerator)
            if vm.chroot.digest != info.digest:
                raise BuildError(
                    f"the chroot cut from the builder image ({vm.chroot.digest}) differs from "
                    f"the one built on the host ({info.digest})")
            for kind, (digest, path) in vm.artifacts.items():
                blobs[digest] = path
                artifacts[kind] = digest
        # The locked packages and keys too: the store alone can rebuild the environment.
        cache.publish(lock, store, vm=wants_vm)
        for digest, path in blobs.items():
            store.put_blob(digest, path)
        store.put_blob(info.digest, archive)
    version = Version(
        digest=info.digest,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        lock_digest=lock.digest(),
        size=info.size,
        tar_sha256=info.tar_sha256,
        tar_size=info.tar_size,
        compression=info.compression.value,
        source_date_epoch=lock.source_date_epoch,
        packages=tuple(p.line() for p in lock.packages),
        artifacts=artifacts,
    )

    def add(index: Index) -> Index:
        return index.with_version(spec.name, version, tags)

    index = store.update_index(add)
    if "vagrant" in artifacts:
        from provision.box import BoxInfo
        from provision.catalog import publish_box

        box_blob = store.local_path(artifacts["vagrant"])
        if box_blob is not None and isinstance(store, LocalStore):
            publish_box(store, spec.name, BoxInfo(box_blob, artifacts["vagrant"].split(":")[1],
                                                  box_blob.stat().st_size),
                        provision_digest=version.digest)
    recorded = index.environments[spec.name].version(version.digest) or version
    return BuildResult(spec.name, recorded, store.url, spec.lock_path)


