"""A Debian root -> a bootable qcow2 that QEMU boots to SSH with passwordless sudo; the disk read
back without booting keeps setuid bits, groups, capabilities, xattrs, hardlinks, holes and device
nodes; a tree made inside the guest is cut out of the powered-off disk; a failure leaves no loop
device, no mount and no dest. Real tools throughout (mmdebstrap, losetup, QEMU): needs root."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from provision import run
from provision.extract import image_path, mounted_image
from provision.image import DiskImage, ImageError, kvm_usable, make_bootable_disk
from provision.spec import host_debian_mirror

TOOLS = ("mmdebstrap", "qemu-system-x86_64", "qemu-img", "extlinux", "sfdisk", "partx", "losetup",
         "mkfs.ext4", "ssh", "ssh-keygen", "useradd", "zstd")


def test_tools_are_installed() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"not installed (run scripts/setup): {', '.join(missing)}"

INCLUDE = "linux-image-amd64,openssh-server,systemd-sysv,sudo,ifupdown,isc-dhcp-client"
SPARSE_SIZE = 64 << 20


def _timing(what: str, seconds: float) -> None:
    print(f"\n[test_image] {what}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image")


@pytest.fixture(scope="module")
def bootable_root(work: Path) -> Path:
    """A small bootable Debian root, plus a few files whose metadata the disk must keep."""
    mirror = host_debian_mirror()
    if mirror is None:
        pytest.fail("apt on this machine names no Debian mirror")
    root = work / "root"
    started = time.monotonic()
    run.run(["mmdebstrap", "--quiet", "--variant=important", f"--include={INCLUDE}", "bookworm", root,
             mirror], capture=True)
    _timing("mmdebstrap", time.monotonic() - started)
    extra = root / "srv/meta"
    extra.mkdir(parents=True)
    (extra / "one").write_text("linked\n")
    os.link(extra / "one", extra / "two")
    os.mknod(extra / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(extra / "loop7", 0o660 | stat.S_IFBLK, os.makedev(7, 7))
    (extra / "attr").write_text("x\n")
    os.setxattr(extra / "attr", "user.provision", b"kept")
    with open(extra / "sparse", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE - 4096)
        f.write(b"z" * 4096)
    return root


@pytest.fixture(scope="module")
def ssh_key(work: Path) -> Path:
    key = work / "id_ed25519"
    run.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "provision-test", "-f", key], capture=True)
    return key


@pytest.fixture(scope="module")
def disk(bootable_root: Path, ssh_key: Path, work: Path) -> DiskImage:
    before = _snapshot(bootable_root)
    started = time.monotonic()
    image = make_bootable_disk(bootable_root, work / "out" / "builder.qcow2", size_mib=3072,
                               authorized_key=ssh_key.with_suffix(".pub").read_text())
    _timing("make_bootable_disk", time.monotonic() - started)
    assert _snapshot(bootable_root) == before, "make_bootable_disk changed the source root"
    return image


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """What must not change in the source root: the files the image configures."""
    out = {}
    for rel in ("etc/fstab", "etc/hostname", "etc/hosts", "etc/passwd", "etc/shadow", "etc/resolv.conf",
                "etc/network/interfaces", "etc/ssh/ssh_host_ed25519_key", "etc/systemd/system", "home",
                "boot"):
        p = root / rel
        if os.path.lexists(p):
            st = p.lstat()
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, len(os.listdir(p)) if p.is_dir() else 0)
    return out


@pytest.mark.mirror
@pytest.mark.slow
def test_disk_is_a_qcow2(disk: DiskImage) -> None:
    assert disk.format == "qcow2"
    assert disk.virtual_size == 3072 << 20
    info = run.output(["qemu-img", "check", disk.path])
    assert "No errors were found" in info
    assert not [p for p in disk.path.parent.iterdir() if p != disk.path], "work files left beside dest"


@pytest.mark.mirror
@pytest.mark.slow
def test_mounted_image_keeps_metadata(disk: DiskImage, bootable_root: Path) -> None:
    with mounted_image(disk.path) as mnt:
        assert os.path.ismount(mnt)
        passwd = (mnt / "usr/bin/passwd").lstat()
        assert stat.S_IMODE(passwd.st_mode) == 0o4755 and passwd.st_uid == 0
        su = (mnt / "usr/bin/su").lstat()
        assert stat.S_IMODE(su.st_mode) == 0o4755
        shadow = (mnt / "etc/shadow").lstat()
        assert shadow.st_gid == (bootable_root / "etc/shadow").lstat().st_gid
        assert _group_name(mnt, shadow.st_gid) == "shadow"
        assert stat.S_IMODE(shadow.st_mode) == 0o640
        cap = os.getxattr(bootable_root / "usr/bin/ping", "security.capability")
        assert os.getxattr(mnt / "usr/bin/ping", "security.capability") == cap
        meta = mnt / "srv/meta"
        assert (meta / "one").stat().st_ino == (meta / "two").stat().st_ino
        assert (meta / "one").stat().st_nlink == 2
        null = (meta / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        blk = (meta / "loop7").lstat()
        assert stat.S_ISBLK(blk.st_mode) and blk.st_rdev == os.makedev(7, 7)
        assert stat.S_ISCHR((mnt / "dev/null").lstat().st_mode)
        assert os.getxattr(meta / "attr", "user.provision") == b"kept"
        sparse = (meta / "sparse").stat()
        assert sparse.st_size == SPARSE_SIZE and sparse.st_blocks * 512 < 1 << 20
        # the copy is configured, not the root
        fstab = (mnt / "etc/fstab").read_text()
        assert "UUID=" in fstab
        assert (mnt / "etc/hostname").read_text() == "builder\n"
        assert not list((mnt / "etc/ssh").glob("ssh_host_*"))
        assert (mnt / "boot/extlinux/ldlinux.sys").is_file()
        assert "console=ttyS0" in (mnt / "boot/extlinux/extlinux.conf").read_text()
        key = (mnt / "home/builder/.ssh/authorized_keys").lstat()
        assert stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid != 0
        with pytest.raises(OSError):  # read-only
            (mnt / "new").write_text("x")
    assert not os.path.exists(mnt)
    assert not _our_loops(disk.path.parent) and not _our_mounts(mnt.parent)


def _group_name(root: Path, gid: int) -> str:
    for line in (root / "etc/group").read_text().splitlines():
        f = line.split(":")
        if int(f[2]) == gid:
            return f[0]
    return ""


@pytest.mark.mirror
@pytest.mark.slow
def test_extract_path_refuses_escapes(disk: DiskImage) -> None:
    with mounted_image(disk.path) as mnt:
        assert image_path(mnt, "/usr/share") == mnt / "usr/share"
        with pytest.raises(ImageError, match="symlink"):
            image_path(mnt, "bin/sh")  # /bin -> usr/bin: followed on the host, it could leave the image
        with pytest.raises(ImageError, match=r"\.\."):
            image_path(mnt, "usr/../etc")
        with pytest.raises(ImageError, match="no such directory"):
            image_path(mnt, "/nonexistent")
        with pytest.raises(ImageError, match="whole image"):
            image_path(mnt, "/")


def test_kvm_probe_answers_quickly() -> None:
    started = time.monotonic()
    usable = kvm_usable()
    assert time.monotonic() - started < 15
    if not os.path.exists("/dev/kvm"):
        assert usable is False
    print(f"\n[test_image] kvm_usable() = {usable}")


# --- failure cleanup ------------------------------------------------------------------------------


def _our_loops(under: Path) -> list[str]:
    """Loop devices whose backing file is under `under` (other users' loop devices are ignored)."""
    out = run.output(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"])
    return [ln for ln in out.splitlines() if str(under) in ln]


def _our_mounts(under: Path) -> list[str]:
    return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(under) in ln]


def test_root_without_kernel_fails_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "etc/hostname").write_text("nokernel\n")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "disk.qcow2"
    with pytest.raises(ImageError, match="no kernel") as err:
        make_bootable_disk(root, dest, size_mib=64)
    assert "\n" not in str(err.value)
    assert not dest.exists() and list(out.iterdir()) == []
    assert not _our_loops(tmp_path) and not _our_mounts(tmp_path)

    dest.write_bytes(b"an older disk")  # a failure leaves an existing dest as it was
    with pytest.raises(ImageError):
        make_bootable_disk(root, dest, size_mib=64)
    assert dest.read_bytes() == b"an older disk"
    assert [p.name for p in out.iterdir()] == ["disk.qcow2"]
    assert not _our_loops(tmp_path) and not _our_mounts(tmp_path)


def test_full_disk_fails_mid_copy_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(80 << 20))  # does not fit on a 64 MiB disk
    out = tmp_path / "out"
    dest = out / "disk.qcow2"
    with pytest.raises(ImageError, match="no space left on the disk") as err:
        make_bootable_disk(root, dest, size_mib=64)
    assert "\n" not in str(err.value)
    assert list(out.iterdir()) == []
    assert not _our_loops(tmp_path) and not _our_mounts(tmp_path)


def test_invalid_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="hostname"):
        make_bootable_disk(tmp_path, tmp_path / "d.qcow2", hostname="bad host")
    with pytest.raises(ImageError, match="user"):
        make_bootable_disk(tmp_path, tmp_path / "d.qcow2", user="root")
    with pytest.raises(ImageError, match="one line"):
        make_bootable_disk(tmp_path, tmp_path / "d.qcow2", authorized_key="ssh-ed25519 A\nssh-rsa B")
    (tmp_path / "root").mkdir()
    with pytest.raises(ImageError, match="inside the root"):
        make_bootable_disk(tmp_path / "root", tmp_path / "root/out/d.qcow2")
    (tmp_path / "root").rmdir()
    with pytest.raises(ImageError, match="not a directory"):
        make_bootable_disk(tmp_path / "nope", tmp_path / "d.qcow2")
    assert list(tmp_path.iterdir()) == []
