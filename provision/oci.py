"""An environment as an OCI image archive (`podman load`, `skopeo copy oci-archive:`,
`mock --buildroot-image`).

One layer: the chroot archive itself when it is zstd (OCI's `tar+zstd` layer; its diff_id is
the tar's sha256 the index already records), or the decompressed tar for xz archives. The config
carries the environment's name, digest and lock digest as labels. The archive is written
deterministically (sorted, dated by the lock's SOURCE_DATE_EPOCH, numeric owners 0), so the
same version always gives the same OCI archive.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from provision import run
from provision.errors import ProvisionError
from provision.fsutil import file_digest
from provision.index import Ref, Version
from provision.store import Store

LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
LABEL = "org.provision"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "amd64": "amd64", "arm64": "arm64"}


@dataclass(frozen=True)
class OciArchive:
    path: Path
    digest: str  # of the archive file
    manifest_digest: str
    layer_digest: str
    image_ref: str  # the name:tag inside the archive


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_archive(name: str, version: Version, archive: Path, dest: Path, *,
                      arch: str = "amd64", tag: str | None = None) -> OciArchive:
    """Write the OCI image archive of `version` (whose chroot archive is at `archive`)."""
    epoch = version.source_date_epoch
    created = dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {f"{LABEL}.name": name, f"{LABEL}.digest": version.digest,
              f"{LABEL}.lock-digest": version.lock_digest,
              "org.opencontainers.image.title": name,
              "org.opencontainers.image.version": version.digest,
              "org.opencontainers.image.created": created}
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=dest.parent) as tmp:
        if version.compression == "zstd":
            layer, media = archive, LAYER_ZSTD
        else:  # OCI has no xz layers: use the tar itself
            layer, media = Path(tmp) / "layer.tar", LAYER_TAR
            with layer.open("wb") as out:
                run.run(["xz", "-dc", str(archive)], stdout=out)
        layer_digest = file_digest(layer)
        if layer_digest != (version.digest if media == LAYER_ZSTD else "sha256:" + version.tar_sha256):
            raise ProvisionError(f"{archive} is not the chroot archive of {name}@{version.digest}")
        config = _json({
            "architecture": ARCH.get(arch, arch), "os": "linux", "created": created,
            "config": {"Labels": labels, "Cmd": ["/bin/sh"], "WorkingDir": "/",
                       "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + version.tar_sha256]},
            "history": [{"created": created, "created_by": f"provision build ({name})"}],
        })
        manifest = _json({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": _sha(config), "size": len(config)},
            "layers": [{"mediaType": media, "digest": layer_digest,
                        "size": layer.stat().st_size}],
            "annotations": labels,
        })
        image_ref = f"{name}:{tag or version.digest.split(':')[1][:16]}"
        index = _json({
            "schemaVersion": 2, "mediaType": INDEX,
            "manifests": [{"mediaType": MANIFEST, "digest": _sha(manifest), "size": len(manifest),
                           "annotations": {"org.opencontainers.image.ref.name": image_ref}}],
        })
        layout = _json({"imageLayoutVersion": "1.0.0"})

        def info(path: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
            ti = tarfile.TarInfo(path)
            ti.size, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = size, epoch, 0, 0, "", ""
            ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
            ti.mode = 0o755 if directory else 0o644
            return ti

        part = Path(tmp) / "oci.tar"
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tf:
            for d in ("blobs", "blobs/sha256"):
                tf.addfile(info(d, 0, directory=True))
            blobs = sorted([(config, _sha(config)), (manifest, _sha(manifest))],
                           key=lambda b: b[1])
            files: list[tuple[str, bytes | Path]] = [
                (f"blobs/sha256/{d.split(':')[1]}", data) for data, d in blobs]
            files.append((f"blobs/sha256/{layer_digest.split(':')[1]}", layer))
            files += [("index.json", index), ("oci-layout", layout)]
            for path, content in sorted(files, key=lambda f: f[0]):
                if isinstance(content, Path):
                    with content.open("rb") as f:
                        tf.addfile(info(path, content.stat().st_size), f)
                else:
                    tf.addfile(info(path, len(content)), io.BytesIO(content))
        part.rename(dest)
    return OciArchive(dest, file_digest(dest), _sha(manifest), layer_digest, image_ref)


def oci_for(ref: Ref, store: Store, out: Path | None, *, cache_dir: Path | None = None,
            arch: str = "amd64") -> tuple[OciArchive, Version]:
    """The OCI archive of a stored version: written to `out` (default: the cache), and added
    to the store as the version's `oci` artifact when the store is writable."""
    from provision.cache import default_cache_dir

    _env, version = store.read_index().resolve(ref)
    if out is not None:
        dest = out.absolute()
        if not dest.parent.is_dir():
            raise ProvisionError(f"--output: {dest.parent} is not a directory")
    else:
        dest = (cache_dir or default_cache_dir()) / "oci" / \
            f"{ref.name}-{version.digest.split(':')[1][:16]}.oci.tar"
        dest.parent.mkdir(parents=True, exist_ok=True)
    local = store.local_path(version.digest)
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=dest.parent) as tmp:
        if local is None:
            local = Path(tmp) / "archive"
            store.get_blob(version.digest, local, label=f"fetching {ref.name}")
        made = Path(tmp) / "oci.tar"
        got = write_oci_archive(ref.name, version, local, made, arch=arch, tag=ref.tag)
        if store.writable:  # (a local store takes a hard link: dest must be another inode)
            store.put_blob(got.digest, made)
            store.update_index(lambda i: i.with_version(
                ref.name, replace(version, artifacts={"oci": got.digest}), ()))
        part = Path(tmp) / "copy"
        shutil.copyfile(made, part)
        part.rename(dest)
    return replace(got, path=dest), version
