"""Reading a finished disk image without booting it: its root file system mounted read-only, and a
tree cut out of it into an archive (e.g. a chroot that was built inside the guest).

A non-raw image (qcow2) is first converted to a sparse temporary raw file, which is attached
read-only to a loop device; its partition is added with partx and mounted with
`ro,noload,nodev,nosuid,noexec` (noload: an unclean journal is not replayed, the image stays as it
is). Everything is released again on the way out, also on errors. Needs root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from provision import run
from provision.errors import CommandFailed
from provision.image import ImageError, attached_partition, mounted

if TYPE_CHECKING:
    from provision.archive import ArchiveInfo, Compression

log = logging.getLogger("provision.extract")

MOUNT_OPTIONS = "ro,noload,nodev,nosuid,noexec"


@contextlib.contextmanager
def mounted_image(image: Path, *, partition: int = 1, workdir: Path | None = None) -> Iterator[Path]:
    """Mount partition `partition` (ext4) of the disk image `image` read-only and yield the mount
    point. `workdir` is where the temporary raw copy of a qcow2 image goes (default: TMPDIR)."""
    if os.geteuid() != 0:
        raise ImageError("mounting a disk image needs root (loop devices, mount)")
    if not image.is_file():
        raise ImageError(f"cannot mount {image}: no such file")
    for tool in ("qemu-img", "losetup", "partx", "mount", "umount"):
        run.require(tool)
    try:
        info = json.loads(run.output(["qemu-img", "info", "--output=json", image]))
    except CommandFailed as e:
        raise ImageError(f"cannot read {image}: {e}") from e
    try:
        tmp = Path(tempfile.mkdtemp(prefix="provision-extract-", dir=workdir))
    except OSError as e:
        raise ImageError(f"cannot make a work directory: {e.strerror or e}") from e
    mnt = tmp / "mnt"
    try:
        mnt.mkdir()
        if info.get("format") == "raw":
            raw = image
        else:
            raw = tmp / "disk.raw"
            try:
                run.run(["qemu-img", "convert", "-q", "-O", "raw", image, raw], capture=True)
            except CommandFailed as e:
                raise ImageError(f"cannot convert {image} to raw: {e}") from e
        with attached_partition(raw, partition=partition, read_only=True) as part, \
                mounted(part, mnt, options=MOUNT_OPTIONS):
            yield mnt
    finally:
        if os.path.ismount(mnt):
            log.error("not removing %s: %s is still mounted", tmp, mnt)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def image_path(mnt: Path, subtree: str) -> Path:
    """`subtree` ("/srv/chroot" or "srv/chroot") inside the mounted image at `mnt`. No component
    may be a symlink (it would be followed on the host, not in the image) nor '..'."""
    rel = PurePosixPath(subtree.lstrip("/"))
    if not rel.parts or rel == PurePosixPath("."):
        raise ImageError(f"subtree {subtree!r} names the whole image; name a directory in it")
    if ".." in rel.parts:
        raise ImageError(f"subtree {subtree!r} must not contain '..'")
    path = mnt
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise ImageError(f"{subtree}: /{path.relative_to(mnt)} is a symlink in the image")
    if not path.is_dir():
        raise ImageError(f"{subtree}: no such directory in the image")
    return path


def extract_tree(
    image: Path,
    subtree: str,
    dest_archive: Path,
    *,
    source_date_epoch: int,
    compression: Compression | None = None,
    exclude: Sequence[str] = (),
    partition: int = 1,
    workdir: Path | None = None,
) -> ArchiveInfo:
    """Archive the directory `subtree` of the disk image `image` into `dest_archive` (a deterministic
    archive, see provision.archive.write_archive), without booting the image."""
    from provision.archive import write_archive

    with mounted_image(image, partition=partition, workdir=workdir) as mnt:
        tree = image_path(mnt, subtree)
        if compression is None:
            return write_archive(tree, dest_archive, source_date_epoch=source_date_epoch, exclude=exclude)
        return write_archive(tree, dest_archive, source_date_epoch=source_date_epoch,
                             compression=compression, exclude=exclude)
