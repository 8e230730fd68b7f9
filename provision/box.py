"""A bootable qcow2 -> a Vagrant box for the libvirt provider (vagrant-libvirt).

A box is a tar of four files, read by Vagrant with bsdtar (which takes plain tar, gzip, xz,
zstd...; Vagrant documents tar, tar.gz and zip, so this module writes plain tar or gzip):

    Vagrantfile     the box's defaults: libvirt driver qemu (TCG), the SSH user, its key
    box.img         the qcow2 disk
    metadata.json   {"provider": "libvirt", "format": "qcow2", "virtual_size": <GiB>}
    vagrant_key     the SSH private key whose public half the image authorizes (optional)

The tar is deterministic (sorted names, mtime 0, owner 0:0, no user or group names, a gzip header
with no name and no time), so the same qcow2 and key give the same box bytes and digest. The box is
written to a temporary file beside `dest` and renamed: `dest` is either complete or left as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from provision.errors import ProvisionError
from provision.fsutil import fsync_dir

QCOW2_MAGIC = b"QFI\xfb"
GIB = 1 << 30
KEY_FILE = "vagrant_key"
Compression = Literal["gzip", "none"]
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class BoxError(ProvisionError):
    """A Vagrant box could not be made."""


@dataclass(frozen=True)
class BoxInfo:
    path: Path
    sha256: str  # hex digest of the box file, as Vagrant's catalogs want it
    size: int  # bytes

    @property
    def digest(self) -> str:
        """The box's store digest, sha256:<hex>."""
        return f"sha256:{self.sha256}"


def qcow2_virtual_size(path: Path) -> int:
    """The virtual size in bytes a qcow2 header declares; BoxError if `path` is no qcow2."""
    try:
        with path.open("rb") as f:
            header = f.read(32)
    except OSError as e:
        raise BoxError(f"cannot read {path}: {e.strerror}") from None
    if len(header) < 32 or header[:4] != QCOW2_MAGIC:
        raise BoxError(f"{path} is not a qcow2 image")
    (version,) = struct.unpack(">I", header[4:8])
    (size,) = struct.unpack(">Q", header[24:32])
    if version not in (2, 3) or size == 0:
        raise BoxError(f"{path} is not a usable qcow2 image (version {version}, size {size})")
    return int(size)


def box_vagrantfile(*, name: str, user: str, private_key: bool) -> str:
    """The Vagrantfile inside the box: defaults that the project's Vagrantfile may override."""
    lines = [
        f"# Defaults of the Vagrant box {name}, written by provision.box.",
        'Vagrant.configure("2") do |config|',
        f'  config.ssh.username = "{user}"',
    ]
    if private_key:
        lines += [
            "  # The image authorizes this key's public half; the key travels with the box.",
            f'  config.ssh.private_key_path = File.expand_path("../{KEY_FILE}", __FILE__)',
            "  config.ssh.insert_key = false",
        ]
    lines += [
        '  config.vm.synced_folder ".", "/vagrant", disabled: true',
        "  config.vm.provider :libvirt do |libvirt|",
        '    libvirt.driver = "qemu"',
        "  end",
        "end",
        "",
    ]
    return "\n".join(lines)


def make_libvirt_box(
    qcow2: Path,
    dest: Path,
    *,
    name: str,
    user: str = "builder",
    private_key: Path | None = None,
    compression: Compression = "gzip",
    compresslevel: int = 6,
) -> BoxInfo:
    """Write `dest`, a Vagrant box for the libvirt provider holding the disk `qcow2`.

    `private_key` is the OpenSSH private key Vagrant logs in with as `user` (the image must
    authorize its public half); without it Vagrant falls back to its own insecure key.
    """
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise BoxError(f"invalid box name {name!r}")
    if not _USER_RE.fullmatch(user):
        raise BoxError(f"invalid user name {user!r}")
    if compression not in ("gzip", "none"):
        raise BoxError(f"unknown box compression {compression!r} (use gzip or none)")
    virtual_size = qcow2_virtual_size(qcow2)
    key: bytes | None = None
    if private_key is not None:
        try:
            key = private_key.read_bytes()
        except OSError as e:
            raise BoxError(f"cannot read {private_key}: {e.strerror}") from None
        if b"PRIVATE KEY-----" not in key:
            raise BoxError(f"{private_key} is not an SSH private key")
    metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": -(-virtual_size // GIB)}
    small: dict[str, tuple[bytes, int]] = {
        "Vagrantfile": (box_vagrantfile(name=name, user=user, private_key=key is not None).encode(), 0o644),
        "metadata.json": ((json.dumps(metadata, indent=1, sort_keys=True) + "\n").encode(), 0o644),
    }
    if key is not None:
        small[KEY_FILE] = (key, 0o600)

    dest = dest.absolute()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    except OSError as e:
        raise BoxError(f"cannot write {dest}: {e.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            out = _HashingWriter(raw)
            if compression == "gzip":
                with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0,
                                   compresslevel=compresslevel) as gz:
                    _write_tar(gz, small, qcow2)
            else:
                _write_tar(out, small, qcow2)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        raise BoxError(f"cannot write {dest}: {e.strerror or e}") from None
    except tarfile.TarError as e:
        raise BoxError(f"cannot write {dest}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return BoxInfo(path=dest, sha256=out.sha256.hexdigest(), size=out.size)


def _write_tar(fileobj: _Stream, small: dict[str, tuple[bytes, int]], qcow2: Path) -> None:
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for member in sorted([*small, "box.img"]):
            if member == "box.img":
                with qcow2.open("rb") as f:
                    tar.addfile(_info(member, os.fstat(f.fileno()).st_size, 0o644), f)
            else:
                data, mode = small[member]
                tar.addfile(_info(member, len(data), mode), io.BytesIO(data))


def _info(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _Stream(Protocol):
    """What tarfile.open(mode="w|") needs of its file (it only writes)."""

    def read(self, size: int, /) -> bytes: ...
    def write(self, b: bytes, /) -> object: ...
    def tell(self) -> int: ...
    def seek(self, pos: int, /) -> object: ...
    def close(self) -> object: ...


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it to `raw`."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int, /) -> bytes:
        raise io.UnsupportedOperation("read")

    def write(self, b: bytes, /) -> int:
        self.raw.write(b)
        self.sha256.update(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("seek")

    def close(self) -> None:
        pass  # the caller closes `raw`

    def flush(self) -> None:
        self.raw.flush()


