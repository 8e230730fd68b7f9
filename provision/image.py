"""A Debian root directory -> a bootable qcow2 disk that QEMU (and Packer's qemu builder) can boot.

The disk is a raw file with an MBR partition table and one bootable ext4 partition, booted by
extlinux (syslinux's MBR code in the first 440 bytes), converted to qcow2 at the end. The root is
copied with tar (owners, modes, setuid bits, ACLs, every xattr including security.capability,
hardlinks, device nodes, sparse files) and only the copy is configured: fstab, hostname, DHCP on the
first NIC, a user with passwordless sudo and an authorized key, SSH host keys made on first boot.

Needs root and, on the host: losetup, partx, sfdisk, mkfs.ext4, mount, tar, useradd, extlinux,
syslinux's mbr.bin and qemu-img. Every mount and loop device is released again, also on errors,
and `dest` is either left as it was or complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from provision import run
from provision.errors import CommandFailed, ProvisionError
from provision.fsutil import fsync_dir

log = logging.getLogger("provision.image")

SECTOR = 512
PARTITION_START = 2048  # sectors: the first partition starts at 1 MiB
MBR_CODE_SIZE = 440  # boot code; the disk signature and the partition table follow
MIN_SIZE_MIB = 64
MBR_BIN_CANDIDATES = (
    Path("/usr/lib/syslinux/mbr/mbr.bin"),  # Debian, Ubuntu (syslinux-common)
    Path("/usr/share/syslinux/mbr.bin"),  # Fedora, Arch
)
# Names fixed by this module inside the image (and so findable by whoever changes it later).
HOST_KEYS_UNIT = "provision-ssh-host-keys.service"
HOST_KEYS_REST_UNIT = "provision-ssh-host-keys-rest.service"
NETWORKD_FILE = "etc/systemd/network/80-provision-dhcp.network"
IFUPDOWN_FILE = "etc/network/interfaces.d/provision-dhcp"
# Under QEMU's user networking (Packer's default) the DNS forwarder is always at this address; a
# DHCP client replaces it at boot where there is one that writes resolv.conf.
QEMU_USER_DNS = "10.0.2.3"
_UUID_NAMESPACE = uuid.UUID("0c6f4b8e-3c1e-5d7a-9a57-5c1a3d1e0b11")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class ImageError(ProvisionError):
    """A disk image could not be made, attached or read."""


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class Network(StrEnum):
    """How the image gets its address: the stack found in the root decides."""

    IFUPDOWN = "ifupdown"
    NETWORKD = "networkd"


@dataclass(frozen=True)
class DiskImage:
    path: Path
    format: str  # "qcow2"
    virtual_size: int  # bytes


@dataclass(frozen=True)
class BootFiles:
    """In-image absolute paths of the kernel and initramfs that extlinux.conf names."""

    kernel: str
    initrd: str


def make_bootable_disk(
    root: Path,
    dest: Path,
    *,
    size_mib: int = 4096,
    hostname: str = "builder",
    authorized_key: str | None = None,
    user: str = "builder",
    fs_uuid: uuid.UUID | None = None,
    kernel_args: Sequence[str] = (),
) -> DiskImage:
    """Make `dest`, a qcow2 disk that boots the Debian root directory `root` under QEMU.

    `root` needs a kernel and initramfs (/boot/vmlinuz-*, /boot/initrd.img-*), openssh-server,
    systemd, sudo and either ifupdown with a DHCP client or systemd-networkd; it is only read.
    The file system UUID is `fs_uuid`, or one derived from the hostname, the size and the kernels
    in the root. Raises ImageError; needs root.
    """
    if not _HOSTNAME_RE.fullmatch(hostname):
        raise ImageError(f"invalid hostname {hostname!r}")
    if not _USER_RE.fullmatch(user) or user == "root":
        raise ImageError(f"invalid user name {user!r}")
    if authorized_key is not None:
        authorized_key = authorized_key.strip()
        if not authorized_key or "\n" in authorized_key or "\r" in authorized_key:
            raise ImageError("authorized_key must be one line (an OpenSSH public key)")
    if size_mib < MIN_SIZE_MIB:
        raise ImageError(f"size_mib must be at least {MIN_SIZE_MIB}, not {size_mib}")
    if not root.is_dir():
        raise ImageError(f"cannot make a disk of {root}: not a directory")
    if os.geteuid() != 0:
        raise ImageError("making a disk image needs root (loop devices, mount)")
    mbr = _mbr_bin()
    for tool in ("losetup", "partx", "sfdisk", "mkfs.ext4", "mount", "umount", "tar", "useradd",
                 "extlinux", "qemu-img"):
        run.require(tool)
    dest = dest.absolute()
    if dest.parent.resolve().is_relative_to(root.resolve()):
        raise ImageError(f"cannot make {dest} inside the root it is made of ({root})")
    if fs_uuid is None:
        kernels = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
        fs_uuid = uuid.uuid5(_UUID_NAMESPACE, "\n".join([hostname, str(size_mib), *kernels]))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.work-", dir=dest.parent))
    except OSError as e:
        raise ImageError(f"cannot write {dest}: {e.strerror or e}") from e

    started = time.monotonic()
    try:
        raw = work / "disk.raw"
        mnt = work / "mnt"
        mnt.mkdir()
        _make_raw(raw, size_mib, fs_uuid)
        with attached_partition(raw) as part:
            _mkfs(part, fs_uuid, hostname)
            with mounted(part, mnt, options="rw"):
                copy_tree(root, mnt)
                _configure(mnt, fs_uuid=fs_uuid, hostname=hostname, user=user,
                           authorized_key=authorized_key, kernel_args=kernel_args)
                run.run(["sync", "--file-system", mnt], capture=True)
        _write_mbr(raw, mbr)
        qcow2 = work / "disk.qcow2"
        run.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2], capture=True)
        raw.unlink()
        info = json.loads(run.output(["qemu-img", "info", "--output=json", qcow2]))
        with open(qcow2, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(qcow2, 0o644)
        os.replace(qcow2, dest)
        fsync_dir(dest.parent)
    except CommandFailed as e:
        raise ImageError(f"cannot make {dest}: {e}") from e
    except OSError as e:
        raise ImageError(f"cannot make {dest}: {e.strerror or e}{_filename(e)}") from e
    finally:
        _remove_workdir(work)
    log.info("made %s in %.0f s", dest, time.monotonic() - started)
    return DiskImage(path=dest, format=str(info["format"]), virtual_size=int(info["virtual-size"]))


# --- block devices ----------------------------------------------------------------------------


@contextlib.contextmanager
def attached_partition(raw: Path, *, partition: int = 1, read_only: bool = False) -> Iterator[Path]:
    """Attach the raw disk file `raw` to a loop device and yield the device of one partition.

    The partition is added with partx (this kernel does not scan MBR partition tables itself).
    The partition and the loop device are removed again on the way out, also on errors.
    """
    argv: list[run.Arg] = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    try:
        loop = run.output([*argv, raw]).strip()
    except CommandFailed as e:
        raise ImageError(f"cannot attach {raw} to a loop device: {e}") from e
    log.debug("attached %s to %s", raw, loop)
    try:
        yield _add_partition(loop, partition)
    finally:
        _detach(loop)


def _add_partition(loop: str, partition: int) -> Path:
    name = Path(loop).name
    sysdir = Path("/sys/block") / name / f"{name}p{partition}"
    if not sysdir.exists():
        try:
            run.run(["partx", "--add", "--nr", str(partition), loop], capture=True)
        except CommandFailed as e:
            if not sysdir.exists():
                raise ImageError(f"cannot add partition {partition} of {loop}: {e}") from e
    dev = Path(f"{loop}p{partition}")
    deadline = time.monotonic() + 10
    while not dev.is_block_device():
        if time.monotonic() > deadline:
            raise ImageError(f"{dev} did not appear after partx --add")
        time.sleep(0.05)
    return dev


def _detach(loop: str) -> None:
    name = Path(loop).name
    steps = [["losetup", "--detach", loop]]
    if list(Path("/sys/block", name).glob(f"{name}p*")):
        steps.insert(0, ["partx", "--delete", loop])
    for argv in steps:
        for attempt in range(5):
            proc = run.run(argv, check=False, capture=True)
            if proc.returncode == 0:
                break
            if attempt == 4:
                log.error("%s failed: %s", " ".join(argv), proc.stderr.decode(errors="replace").strip())
            time.sleep(0.2 * (attempt + 1))


@contextlib.contextmanager
def mounted(device: Path, mountpoint: Path, *, options: str, fstype: str = "ext4") -> Iterator[Path]:
    """Mount `device` on `mountpoint` for the duration of the block; unmounts also on errors."""
    try:
        run.run(["mount", "-t", fstype, "-o", options, device, mountpoint], capture=True)
    except CommandFailed as e:
        raise ImageError(f"cannot mount {device}: {e}") from e
    try:
        yield mountpoint
    finally:
        _umount(mountpoint)


def _umount(mountpoint: Path) -> None:
    for attempt in range(5):
        proc = run.run(["umount", mountpoint], check=False, capture=True)
        if proc.returncode == 0 or not os.path.ismount(mountpoint):
            return
        time.sleep(0.2 * (attempt + 1))
    log.error("umount %s failed (%s); detaching it lazily", mountpoint,
              proc.stderr.decode(errors="replace").strip())
    run.run(["umount", "--lazy", mountpoint], check=False, capture=True)


def _remove_workdir(work: Path) -> None:
    mnt = work / "mnt"
    if mnt.exists() and os.path.ismount(mnt):
        log.error("not removing %s: %s is still mounted", work, mnt)
        return
    shutil.rmtree(work, ignore_errors=True)


# --- building the disk ------------------------------------------------------------------------


def _make_raw(raw: Path, size_mib: int, fs_uuid: uuid.UUID) -> None:
    with open(raw, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    table = (
        "label: dos\n"
        f"label-id: 0x{fs_uuid.hex[:8]}\n"
        "unit: sectors\n"
        "\n"
        f"start={PARTITION_START}, type=83, bootable\n"
    )
    run.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", raw], capture=True,
            input=table.encode())


def _mkfs(part: Path, fs_uuid: uuid.UUID, label: str) -> None:
    run.run(
        ["mkfs.ext4", "-F", "-q", "-L", label[:16], "-U", str(fs_uuid), "-m", "1",
         "-E", f"root_owner=0:0,hash_seed={fs_uuid}", part],
        capture=True,
        extra_env={"LC_ALL": "C"},
    )


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the tree `src` into the existing directory `dst` with everything a root needs kept:
    numeric owners, modes incl. setuid, ACLs, all xattrs (security.capability too), hardlinks,
    device nodes and holes. Stays on `src`'s file system (a mounted /proc is not copied)."""
    create = ["tar", "--create", "--file=-", "--numeric-owner", "--xattrs", "--xattrs-include=*",
              "--acls", "--sparse", "--one-file-system", f"--directory={src}", "."]
    extract = ["tar", "--extract", "--file=-", "--numeric-owner", "--same-owner",
               "--preserve-permissions", "--xattrs", "--xattrs-include=*", "--acls",
               f"--directory={dst}"]
    env = {"LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryFile() as err_c, tempfile.TemporaryFile() as err_x:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            producer = run.popen(create, extra_env=env, stdout=subprocess.PIPE, stderr=err_c,
                                 stdin=subprocess.DEVNULL)
            procs.append(producer)
            assert producer.stdout is not None
            try:
                procs.append(run.popen(extract, extra_env=env, stdin=producer.stdout, stderr=err_x,
                                       stdout=subprocess.DEVNULL))
            finally:
                producer.stdout.close()
            codes = [p.wait() for p in procs]
        finally:  # an error or an interrupt: no tar may go on writing into `dst`
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        # The extracting side's error is the cause; the creating side then dies of SIGPIPE.
        for code, err, what in ((codes[1], err_x, "writing"), (codes[0], err_c, "reading")):
            if code != 0:
                reason = _tar_error(err)
                if what == "writing" and _full(dst):
                    reason = f"no space left on the disk (make it bigger) - {reason}"
                raise ImageError(f"copying {src} failed ({what}): {reason}")


def _full(path: Path) -> bool:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < (1 << 20) or st.f_favail == 0


def _tar_error(f: IO[bytes]) -> str:
    """tar's first real complaint (its last line is only 'Exiting with failure status')."""
    lines = [ln.strip() for ln in _tail(f).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Exiting with failure status" not in ln]
    return (useful or lines or ["tar failed"])[0]


def _tail(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read(64 * 1024).decode(errors="replace")


def _write_mbr(raw: Path, mbr: Path) -> None:
    code = mbr.read_bytes()[:MBR_CODE_SIZE]
    with open(raw, "r+b") as f:
        f.write(code)
        f.flush()
        os.fsync(f.fileno())


def _mbr_bin() -> Path:
    for p in MBR_BIN_CANDIDATES:
        if p.is_file():
            return p
    raise ImageError("syslinux's mbr.bin is not installed (Debian: apt-get install syslinux-common)")


# --- configuring the copy ---------------------------------------------------------------------


def _configure(mnt: Path, *, fs_uuid: uuid.UUID, hostname: str, user: str,
               authorized_key: str | None, kernel_args: Sequence[str]) -> None:
    boot = find_boot_files(mnt)
    missing = [what for what, paths in (
        ("openssh-server", ("usr/sbin/sshd",)),
        ("sudo", ("usr/bin/sudo",)),
        ("systemd", ("lib/systemd/systemd", "usr/lib/systemd/systemd")),
    ) if not any(_exists(mnt, p) for p in paths)]
    if missing:
        raise ImageError(f"the root lacks what the image needs to boot and be reached: {', '.join(missing)}")
    _write(mnt, "etc/fstab",
           "# written by provision.image\n"
           f"UUID={fs_uuid}\t/\text4\terrors=remount-ro\t0\t1\n")
    _write(mnt, "etc/hostname", f"{hostname}\n")
    _write_hosts(mnt, hostname)
    network = _configure_network(mnt)
    _configure_user(mnt, user, authorized_key)
    _configure_ssh_host_keys(mnt)
    _install_extlinux(mnt, boot, fs_uuid, kernel_args)
    log.debug("configured %s: network %s, boot %s", mnt, network, boot)


def find_boot_files(mnt: Path) -> BootFiles:
    """The kernel and initramfs to boot: Debian's /vmlinuz and /initrd.img symlinks (kept current
    by kernel upgrades) where they point at files, else the newest /boot/vmlinuz-* with its
    initramfs."""
    for kernel, initrd in (("vmlinuz", "initrd.img"), ("boot/vmlinuz", "boot/initrd.img")):
        k, i = mnt / kernel, mnt / initrd
        if k.is_symlink() and i.is_symlink() and _in_image_file(mnt, k) and _in_image_file(mnt, i):
            return BootFiles(kernel=f"/{kernel}", initrd=f"/{initrd}")
    kernels = sorted((mnt / "boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name[8:]))
    if not kernels:
        raise ImageError("the root has no kernel (/boot/vmlinuz-*): install linux-image-amd64 in it")
    version = kernels[-1].name[len("vmlinuz-"):]
    initrd_path = mnt / "boot" / f"initrd.img-{version}"
    if not initrd_path.is_file():
        raise ImageError(f"the root has no initramfs for kernel {version} (/boot/initrd.img-{version})")
    return BootFiles(kernel=f"/boot/vmlinuz-{version}", initrd=f"/boot/initrd.img-{version}")


def _in_image_file(mnt: Path, link: Path) -> bool:
    """Whether the symlink `link` points (one level, relative or in-image absolute) at a file."""
    target = os.readlink(link)
    resolved = mnt / target.lstrip("/") if target.startswith("/") else link.parent / target
    return resolved.is_file() and not resolved.is_symlink()


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|[^\d.+~-]+", version)]


def _exists(mnt: Path, rel: str) -> bool:
    return os.path.lexists(mnt / rel)


def _write(mnt: Path, rel: str, text: str, mode: int = 0o644, *, uid: int = 0, gid: int = 0) -> Path:
    """Write a file in the image; never follows a symlink that is already there."""
    path = mnt / rel
    if path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        os.fchmod(f.fileno(), mode)
        os.fchown(f.fileno(), uid, gid)
    return path


def _symlink(mnt: Path, rel: str, target: str) -> None:
    path = mnt / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        path.unlink()
    path.symlink_to(target)


def _write_hosts(mnt: Path, hostname: str) -> None:
    hosts = mnt / "etc/hosts"
    lines = hosts.read_text().splitlines() if hosts.is_file() and not hosts.is_symlink() else []
    if not any(ln.split()[:1] == ["127.0.0.1"] for ln in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    lines = [ln for ln in lines if not ln.startswith("127.0.1.1")]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("127.0.0.1")) + 1
    lines.insert(at, f"127.0.1.1\t{hostname}")
    _write(mnt, "etc/hosts", "\n".join(lines) + "\n")


def _unit_path(mnt: Path, unit: str) -> str | None:
    for d in ("lib/systemd/system", "usr/lib/systemd/system"):
        if (mnt / d / unit).is_file():
            return f"/{d}/{unit}"
    return None


def _configure_network(mnt: Path) -> Network:
    """DHCP on the first NIC: eth0 with net.ifnames=0 (as booted here), en* otherwise."""
    dhcp_clients = ("usr/sbin/dhclient", "sbin/dhclient", "usr/sbin/dhcpcd", "usr/sbin/udhcpc",
                    "sbin/udhcpc")
    if _exists(mnt, "usr/sbin/ifup") and any(_exists(mnt, c) for c in dhcp_clients):
        stanzas = "".join(f"allow-hotplug {n}\niface {n} inet dhcp\n\n" for n in ("eth0", "ens3"))
        _write(mnt, IFUPDOWN_FILE,
               "# written by provision.image: DHCP on the first NIC (eth0 with net.ifnames=0)\n\n"
               + stanzas.rstrip("\n") + "\n")
        interfaces = mnt / "etc/network/interfaces"
        text = interfaces.read_text() if interfaces.is_file() else ""
        if not re.search(r"^\s*source(-directory)?\s+/etc/network/interfaces\.d", text, re.M):
            _write(mnt, "etc/network/interfaces",
                   text + "\nsource /etc/network/interfaces.d/*\n" if text else
                   "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
        network = Network.IFUPDOWN
    else:
        service = _unit_path(mnt, "systemd-networkd.service")
        if service is None:
            raise ImageError("the root has no network stack: install ifupdown and isc-dhcp-client in it "
                             "(or use systemd-networkd)")
        _write(mnt, NETWORKD_FILE,
               "# written by provision.image: DHCP on the first NIC\n"
               "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n")
        wants = [("multi-user.target.wants", "systemd-networkd.service"),
                 ("sockets.target.wants", "systemd-networkd.socket"),
                 ("network-online.target.wants", "systemd-networkd-wait-online.service")]
        for target, unit in wants:
            path = _unit_path(mnt, unit)
            if path is not None:
                _symlink(mnt, f"etc/systemd/system/{target}/{unit}", path)
        _symlink(mnt, "etc/systemd/system/dbus-org.freedesktop.network1.service", service)
        network = Network.NETWORKD
    resolv = mnt / "etc/resolv.conf"
    if not resolv.is_symlink():  # a build host's resolv.conf means nothing in the guest
        _write(mnt, "etc/resolv.conf",
               "# written by provision.image; the DHCP client replaces it at boot\n"
               f"nameserver {QEMU_USER_DNS}\n")
    return network


def _passwd_entry(mnt: Path, user: str) -> tuple[int, int, str] | None:
    passwd = mnt / "etc/passwd"
    if not passwd.is_file():
        return None
    for line in passwd.read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    return None


def _configure_user(mnt: Path, user: str, authorized_key: str | None) -> None:
    if _passwd_entry(mnt, user) is None:
        run.run(["useradd", "--root", mnt, "--create-home", "--user-group", "--shell", "/bin/bash",
                 "--comment", "provision build user", user], capture=True)
    entry = _passwd_entry(mnt, user)
    if entry is None:
        raise ImageError(f"useradd did not create {user} in the image")
    uid, gid, home = entry
    _write(mnt, f"etc/sudoers.d/90-provision-{user}", f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440)
    if authorized_key is not None:
        home_dir = mnt / home.lstrip("/")
        if home_dir.is_symlink() or not home_dir.is_dir():
            raise ImageError(f"{user}'s home {home} is not a directory in the image")
        ssh_dir = home_dir / ".ssh"
        if ssh_dir.is_symlink():
            raise ImageError(f"{home}/.ssh is a symlink in the image")
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(ssh_dir, 0o700)
        os.chown(ssh_dir, uid, gid)
        _write(mnt, str((ssh_dir / "authorized_keys").relative_to(mnt)), authorized_key + "\n", 0o600,
               uid=uid, gid=gid)


def _configure_ssh_host_keys(mnt: Path) -> None:
    """No host key is baked into the image; each boot makes the missing ones. An ed25519 key is
    made before sshd starts (RSA would take ~30 s under TCG, on the path to SSH), the other types
    after it, for the next start of sshd."""
    for key in (mnt / "etc/ssh").glob("ssh_host_*key*"):
        key.unlink()
    header = "# written by provision.image: the image carries no SSH host keys\n"
    _write(mnt, f"etc/systemd/system/{HOST_KEYS_UNIT}",
           header +
           "[Unit]\n"
           "Description=Generate the SSH host key sshd starts with\n"
           "Before=ssh.service ssh.socket\n"
           "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n"
           "\n"
           "[Service]\n"
           "Type=oneshot\n"
           'ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key\n'
           "RemainAfterExit=yes\n"
           "\n"
           "[Install]\n"
           "WantedBy=ssh.service ssh.socket multi-user.target\n")
    _write(mnt, f"etc/systemd/system/{HOST_KEYS_REST_UNIT}",
           header +
           "[Unit]\n"
           "Description=Generate the other missing SSH host keys\n"
           "After=ssh.service\n"
           "\n"
           "[Service]\n"
           "Type=oneshot\n"
           "Nice=10\n"
           "ExecStart=/usr/bin/ssh-keygen -A\n"
           "\n"
           "[Install]\n"
           "WantedBy=multi-user.target\n")
    links = [("ssh.service.wants", HOST_KEYS_UNIT), ("ssh.socket.wants", HOST_KEYS_UNIT),
             ("multi-user.target.wants", HOST_KEYS_UNIT), ("multi-user.target.wants", HOST_KEYS_REST_UNIT)]
    for target, unit in links:
        _symlink(mnt, f"etc/systemd/system/{target}/{unit}", f"/etc/systemd/system/{unit}")


def _install_extlinux(mnt: Path, boot: BootFiles, fs_uuid: uuid.UUID, kernel_args: Sequence[str]) -> None:
    cmdline = " ".join([f"root=UUID={fs_uuid}", "ro", "console=tty0", "console=ttyS0,115200n8",
                        "net.ifnames=0", "biosdevname=0", *kernel_args])
    if "\n" in cmdline:
        raise ImageError("kernel_args must not contain newlines")
    conf_dir = mnt / "boot/extlinux"
    conf_dir.mkdir(parents=True, exist_ok=True)
    _write(mnt, "boot/extlinux/extlinux.conf",
           "# written by provision.image\n"
           "SERIAL 0 115200\n"
           "DEFAULT provision\n"
           "PROMPT 0\n"
           "TIMEOUT 1\n"
           "\n"
           "LABEL provision\n"
           f"  LINUX {boot.kernel}\n"
           f"  INITRD {boot.initrd}\n"
           f"  APPEND {cmdline}\n")
    run.run(["extlinux", "--install", conf_dir], capture=True)


def _filename(e: OSError) -> str:
    return f": {e.filename}" if e.filename else ""


# --- booting it ---------------------------------------------------------------------------------

# A 64 KiB BIOS whose reset vector counts ECX down from 2**24 and then writes 0x10 to QEMU's
# isa-debug-exit port (QEMU exits with (0x10 << 1) | 1 = 33): cli; mov ecx, 0x1000000;
# 1: dec ecx; jnz 1b; mov al, 0x10; out 0xf4, al; hlt. A working KVM runs it in milliseconds.
_PROBE_CODE = bytes.fromhex("fa66b900000001664975fcb010e6f4f4")
_PROBE_EXIT = 33
KVM_PROBE_TIMEOUT = 5.0


@functools.cache
def kvm_usable() -> bool:
    """Whether QEMU can really run a guest with KVM here: /dev/kvm opening is not enough (on some
    hosts it opens and even runs real mode code, but at a crawl or until an emulation failure), so
    a tiny guest has to run 2**24 loop iterations within a few seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None:
        return False
    bios = bytearray(b"\xf4" * 0x10000)
    bios[0xFFF0:0xFFF0 + len(_PROBE_CODE)] = _PROBE_CODE
    with tempfile.NamedTemporaryFile(prefix="kvm-probe-", suffix=".bin") as f:
        f.write(bios)
        f.flush()
        proc = run.popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-nodefaults", "-display", "none",
             "-no-reboot", "-m", "16", "-bios", f.name, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
             "-serial", "none", "-monitor", "none"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=KVM_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log.info("KVM is not usable: a probe guest did not finish in %.0f s", KVM_PROBE_TIMEOUT)
            return False
    log.info("KVM probe exited with %d", rc)
    return rc == _PROBE_EXIT


def qemu_accel() -> Accel:
    return Accel.KVM if kvm_usable() else Accel.TCG


def qemu_argv(disk: Path, *, ssh_port: int, accel: Accel | None = None, memory_mib: int = 1024,
              cpus: int = 2, snapshot: bool = False) -> list[str]:
    """The QEMU command line that boots `disk` with its SSH port forwarded to 127.0.0.1:`ssh_port`
    and its serial console on stdout."""
    accel = qemu_accel() if accel is None else accel
    drive = f"file={disk},if=virtio,format=qcow2"
    argv = ["qemu-system-x86_64", "-accel", str(accel), "-cpu", "host" if accel is Accel.KVM else "max",
            "-m", str(memory_mib), "-smp", str(cpus), "-nographic", "-drive", drive,
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0"]
    if snapshot:
        argv.append("-snapshot")
    return argv

