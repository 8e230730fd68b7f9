"""Publish: copy an environment version from one store to another (as `docker push` does).

Every blob the version needs (the chroot archive, its lock, its other outputs) is copied first,
each verified against its digest; the index entry is written last, so a consumer never sees a
version whose blobs are not all there. Re-publishing is a no-op for blobs that exist.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from provision.errors import ProvisionError, StoreError
from provision.index import Index, Ref, Version
from provision.store import Store


@dataclass(frozen=True)
class Published:
    name: str
    version: Version
    store: str
    public_url: str | None  # where consumers read it without credentials
    copied: int  # blobs uploaded (0: all were there already)
    amis: dict[str, str]


def version_blobs(store: Store, version: Version, work: Path) -> list[tuple[str, str]]:
    """(label, digest) of every blob a version refers to: the chroot archive, its lock, its
    other outputs, the locked packages and keys, and the files of its source bundle -- the ones
    the store has (packages and sources are there when published)."""
    from provision.sources import manifest_digests
    from provision.stored import read_blob, stored_lock

    blobs = [("chroot", version.digest), ("lock", version.lock_digest)]
    blobs += sorted(version.artifacts.items())
    lock = stored_lock(store, version, work)
    extra = [(f"package {p.name}", "sha256:" + p.sha256)
             for p in (*lock.packages, *lock.vm_packages)]
    extra += [(f"key of {k.repo}", "sha256:" + k.sha256) for k in lock.keys]
    if "sources" in version.artifacts:
        extra += [("source", d) for d in
                  manifest_digests(read_blob(store, version.artifacts["sources"], work))]
    seen = {d for _, d in blobs}
    for label, digest in extra:
        if digest not in seen and store.has_blob(digest):
            seen.add(digest)
            blobs.append((label, digest))
    return blobs


def gate_version(store: Store, name: str, version: Version, work: Path) -> None:
    """The publish gate on a stored version, as published: its archive, and the spec's
    forbidden packages and allow-list."""
    from provision.gate import enforce, scan_archive
    from provision.stored import stored_spec

    spec = stored_spec(store, version, work, name) if "spec" in version.artifacts else None
    with _local_copy(store, version.digest, work, f"reading {name}") as archive:
        findings = scan_archive(
            archive, packages=[line.split(" ", 1)[0] for line in version.packages],
            forbidden=spec.forbidden if spec else (), allow=spec.allow if spec else ())
    enforce(findings, name)


@contextlib.contextmanager
def _local_copy(store: Store, digest: str, work: Path, label: str) -> Iterator[Path]:
    path = store.local_path(digest)
    if path is not None:
        yield path
        return
    tmp = work / digest.replace(":", "-")
    store.get_blob(digest, tmp, label=label)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def publish(ref: Ref, src: Store, dest: Store, *, ami_regions: Sequence[str] = (),
            work_dir: Path | None = None) -> Published:
    if not dest.writable:
        raise StoreError(f"{dest.url} is a read-only store; publish to a path or s3:// URL")
    if ami_regions:
        from provision.s3 import S3Store

        if not isinstance(dest, S3Store):
            raise ProvisionError("AMIs are imported from an S3 bucket: publish to an s3:// store")
    src_index = src.read_index()
    env, version = src_index.resolve(ref)
    if ami_regions and "qcow2" not in version.artifacts:
        raise ProvisionError(f"{ref.name}@{version.digest} has no VM image to make an AMI from "
                             "(add qcow2 to the spec's outputs)")
    tags = tuple(sorted(t for t, d in env.tags.items() if d == version.digest))
    copied = 0
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=work_dir) as tmp:
        work = Path(tmp)
        gate_version(src, ref.name, version, work)  # before anything is uploaded
        for what, digest in version_blobs(src, version, work):
            if dest.has_blob(digest):
                continue
            with _local_copy(src, digest, work, f"reading {ref.name} {what}") as path:
                dest.put_blob(digest, path)
            copied += 1

        def add(index: Index) -> Index:
            return index.with_version(ref.name, version, tags)

        index = dest.update_index(add)
        amis: dict[str, str] = {}
        if ami_regions:
            from provision.ami import publish_amis
            from provision.s3 import S3Store

            assert isinstance(dest, S3Store)
            recorded = index.environments[ref.name].version(version.digest) or version
            with _local_copy(src, version.artifacts["qcow2"], work,
                             f"reading {ref.name} qcow2") as image:
                amis = publish_amis(dest, ref.name, recorded, image, list(ami_regions))
            index = dest.read_index()
    public_url = getattr(dest, "public_url", None)
    recorded = index.environments[ref.name].version(version.digest) or version
    if copied == 0:
        print(f"provision: {dest.url} already had every blob of {ref.name}@{version.digest[:19]}",
              file=sys.stderr)
    return Published(ref.name, recorded, dest.url, public_url, copied, amis)
