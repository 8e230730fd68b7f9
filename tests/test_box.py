"""Vagrant boxes for the libvirt provider and their catalogs: the box tar is deterministic, the
catalog is Vagrant's metadata format and grows on every publish, Vagrant itself adds a box from a
catalog, and - the real thing - the top-level Vagrantfile brings up the pinned builder under
libvirt (TCG) from a store, reachable over SSH as `builder` with passwordless sudo.

Needs root, Vagrant with vagrant-libvirt, libvirt, QEMU, mmdebstrap and the Debian mirror of this
machine's apt sources. Nothing is skipped: a missing tool fails."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from yumrepo import HttpServer

from provision import box as box_module
from provision import run
from provision import vagrant as vg
from provision.box import BoxError, BoxInfo, make_libvirt_box
from provision.catalog import (
    BoxVersion,
    CatalogError,
    catalog_for,
    catalog_url,
    catalog_versions,
    publish_box,
    read_catalog,
    write_catalog,
)
from provision.store import LocalStore

REPO = Path(__file__).resolve().parent.parent
LIBVIRTD = REPO / "scripts" / "libvirtd"
INCLUDE = "linux-image-amd64,openssh-server,systemd-sysv,sudo,ifupdown,isc-dhcp-client"
URI = "qemu:///system"
HEX = "0123456789abcdef" * 4


def _timing(what: str, seconds: float) -> None:
    print(f"\n[test_box] {what}: {seconds:.1f} s")


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (scripts/setup installs them)")


def _small_qcow2(path: Path, size: str = "1G") -> Path:
    _need("qemu-img")
    run.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], capture=True)
    return path


def _key(path: Path) -> Path:
    _need("ssh-keygen")
    run.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "provision-test", "-f", path], capture=True)
    return path


# --- fast: the box file ---------------------------------------------------------------------------


def test_box_is_deterministic_and_complete(tmp_path: Path) -> None:
    disk = _small_qcow2(tmp_path / "disk.qcow2", "3G")
    key = _key(tmp_path / "key")
    boxes: list[BoxInfo] = []
    for i in range(2):
        boxes.append(make_libvirt_box(disk, tmp_path / f"out{i}" / "b.box", name="demo", private_key=key))
    assert boxes[0].sha256 == boxes[1].sha256
    assert boxes[0].size == boxes[1].size == boxes[0].path.stat().st_size
    assert hashlib.sha256(boxes[0].path.read_bytes()).hexdigest() == boxes[0].sha256
    assert boxes[0].digest == f"sha256:{boxes[0].sha256}"
    assert boxes[0].path.read_bytes()[:2] == b"\x1f\x8b"  # gzip

    with tarfile.open(boxes[0].path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["Vagrantfile", "box.img", "metadata.json", "vagrant_key"]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
            assert m.isfile()
        modes = {m.name: m.mode for m in members}
        assert modes["vagrant_key"] == 0o600 and modes["box.img"] == 0o644

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None
            return f.read()

        metadata = json.loads(read("metadata.json"))
        assert metadata == {"provider": "libvirt", "format": "qcow2", "virtual_size": 3}
        assert read("box.img") == disk.read_bytes()
        assert read("vagrant_key") == key.read_bytes()
        vagrantfile = read("Vagrantfile").decode()
    assert 'config.ssh.username = "builder"' in vagrantfile
    assert 'File.expand_path("../vagrant_key", __FILE__)' in vagrantfile
    assert "config.ssh.insert_key = false" in vagrantfile
    assert 'libvirt.driver = "qemu"' in vagrantfile

    plain = [make_libvirt_box(disk, tmp_path / f"plain{i}.box", name="demo", private_key=key,
                              compression="none") for i in range(2)]
    assert plain[0].sha256 == plain[1].sha256 != boxes[0].sha256
    with tarfile.open(plain[0].path, "r:") as tar:  # an uncompressed tar
        assert tar.getnames() == ["Vagrantfile", "box.img", "metadata.json", "vagrant_key"]

    nokey = make_libvirt_box(disk, tmp_path / "nokey.box", name="demo", user="ci")
    with tarfile.open(nokey.path) as tar:
        assert tar.getnames() == ["Vagrantfile", "box.img", "metadata.json"]
        f = tar.extractfile("Vagrantfile")
        assert f is not None
        text = f.read().decode()
    assert 'config.ssh.username = "ci"' in text and "private_key_path" not in text


def test_box_failures_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notqcow = tmp_path / "raw.img"
    notqcow.write_bytes(b"\0" * 4096)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "b.box"
    with pytest.raises(BoxError, match="not a qcow2"):
        make_libvirt_box(notqcow, dest, name="demo")
    disk = _small_qcow2(tmp_path / "d.qcow2")
    pub = tmp_path / "key.pub"
    pub.write_text("ssh-ed25519 AAAA test\n")
    with pytest.raises(BoxError, match="not an SSH private key"):
        make_libvirt_box(disk, dest, name="demo", private_key=pub)
    with pytest.raises(BoxError, match="invalid user"):
        make_libvirt_box(disk, dest, name="demo", user='x"; system("id")')
    with pytest.raises(BoxError, match="invalid box name"):
        make_libvirt_box(disk, dest, name="../x")
    # A write failing half-way (a full disk): the old dest stays as it was, no temporary file is left.
    dest.write_text("old box\n")

    def full(fileobj: Any, small: Any, qcow2: Path) -> None:
        fileobj.write(b"x" * 100_000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(box_module, "_write_tar", full)
    with pytest.raises(BoxError, match="No space left") as info:
        make_libvirt_box(disk, dest, name="demo")
    assert "\n" not in str(info.value)
    assert dest.read_text() == "old box\n"
    assert sorted(p.name for p in out.iterdir()) == ["b.box"]


# --- fast: the catalog ----------------------------------------------------------------------------


def test_catalog_shape() -> None:
    url = "file:///srv/store/blobs/sha256/" + HEX
    got = catalog_for("bookworm-build", [("0.1700000002", url, HEX), ("0.1700000001", url, "f" * 64)],
                      description="the builder")
    assert got == {
        "name": "bookworm-build",
        "description": "the builder",
        "versions": [
            {"version": "0.1700000001",
             "providers": [{"name": "libvirt", "url": url, "checksum_type": "sha256", "checksum": "f" * 64}]},
            {"version": "0.1700000002",
             "providers": [{"name": "libvirt", "url": url, "checksum_type": "sha256", "checksum": HEX}]},
        ],
    }
    assert "description" not in catalog_for("e", [])
    for bad in [("1.0-beta", url, HEX), ("v1", url, HEX), ("1.0", "ftp://x/y", HEX), ("1.0", url, "abc")]:
        with pytest.raises(CatalogError):
            catalog_for("e", [bad])
    with pytest.raises(CatalogError):
        catalog_for("Bad Name", [])
    with pytest.raises(CatalogError, match="twice"):
        catalog_for("e", [("1.0", url, HEX), ("1.0", url, "f" * 64)])
    assert catalog_url("/srv/store", "e") == "file:///srv/store/vagrant/e.json"
    assert catalog_url("http://h/store/", "e") == "http://h/store/vagrant/e.json"


def test_write_catalog_adds_versions_atomically(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert read_catalog(store, "env") is None
    url = "http://127.0.0.1:8000/store/blobs/sha256/" + HEX
    write_catalog(store, "env", [("0.10", url, HEX)], description="d")
    write_catalog(store, "env", [BoxVersion("0.9", url, "e" * 64, "sha256:" + "d" * 64)])
    write_catalog(store, "env", [("0.10", url, HEX)])  # the same again: no change
    path = tmp_path / "store" / "vagrant" / "env.json"
    data = json.loads(path.read_text())
    assert data["name"] == "env" and data["description"] == "d"
    assert [v["version"] for v in data["versions"]] == ["0.9", "0.10"]  # numeric order
    assert data["versions"][0]["provision_digest"] == "sha256:" + "d" * 64
    assert read_catalog(store, "env") == data
    with pytest.raises(CatalogError, match="already published"):
        write_catalog(store, "env", [("0.10", url, "f" * 64)])
    assert json.loads(path.read_text()) == data
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "env.json"]


def test_publish_box_stores_blob_and_catalog(tmp_path: Path) -> None:
    disk = _small_qcow2(tmp_path / "d.qcow2")
    box = make_libvirt_box(disk, tmp_path / "b.box", name="env", compression="none")
    store = LocalStore(tmp_path / "store")
    v1 = publish_box(store, "env", box, version="0.1", provision_digest="sha256:" + "a" * 64)
    assert v1.url == (tmp_path / "store").as_uri() + f"/blobs/sha256/{box.sha256}"
    assert store.local_path(box.digest) is not None
    assert publish_box(store, "env", box, provision_digest="sha256:" + "a" * 64) == v1  # published
    v2 = publish_box(store, "env", box, version="0.2", base_url="http://127.0.0.1:9/s/")
    assert v2.url == f"http://127.0.0.1:9/s/blobs/sha256/{box.sha256}"
    assert [v.version for v in catalog_versions(store, "env")] == ["0.1", "0.2"]


def test_parse_ssh_config() -> None:
    text = ("Host default\n  HostName 192.168.122.5\n  User builder\n  Port 22\n"
            '  IdentityFile "/a b/vagrant_key"\n  IdentityFile /other\n  IdentitiesOnly yes\n\n')
    cfg = vg.parse_ssh_config(text)
    assert cfg["HostName"] == "192.168.122.5" and cfg["IdentityFile"] == "/a b/vagrant_key"
    argv = vg.ssh_argv(cfg, ["true"])
    assert argv[-2:] == ["builder@192.168.122.5", "true"] and "/a b/vagrant_key" in argv


def test_vagrant_adds_box_from_catalog(tmp_path: Path) -> None:
    """Vagrant itself accepts the catalog and the box (checksum, tar, metadata): no VM needed."""
    _need("vagrant", "bsdtar", "curl")
    disk = _small_qcow2(tmp_path / "d.qcow2")
    box = make_libvirt_box(disk, tmp_path / "b.box", name="catalog-test", private_key=_key(tmp_path / "k"))
    store = LocalStore(tmp_path / "store")
    v = publish_box(store, "catalog-test", box, version="0.5")
    home = tmp_path / "vagrant-home"
    started = time.monotonic()
    vg.vagrant(["box", "add", "--provider", "libvirt", catalog_url(str(store.root), "catalog-test")],
               home=home)
    _timing("vagrant box add (1 GiB sparse qcow2)", time.monotonic() - started)
    assert vg.box_list(home=home) == [("catalog-test", "libvirt", "0.5")]
    unpacked = home / "boxes" / "catalog-test" / "0.5" / "libvirt"
    assert (unpacked / "box.img").read_bytes() == disk.read_bytes()
    assert (unpacked / "vagrant_key").stat().st_mode & 0o777 == 0o600
    assert json.loads((unpacked / "metadata.json").read_text())["format"] == "qcow2"
    assert v.version == "0.5"
    vg.box_remove("catalog-test", home=home)
    assert vg.box_list(home=home) == []
    with pytest.raises(vg.VagrantError, match="vagrant box remove failed"):
        vg.box_remove("catalog-test", home=home)


def test_vagrant_adds_box_from_catalog_over_http(tmp_path: Path) -> None:
    """The same store directory served by a static HTTP server: a catalog with http:// box URLs."""
    _need("vagrant", "bsdtar", "curl")
    disk = _small_qcow2(tmp_path / "d.qcow2")
    box = make_libvirt_box(disk, tmp_path / "b.box", name="http-test", compression="none")
    store = LocalStore(tmp_path / "store")
    home = tmp_path / "vagrant-home"
    with HttpServer(store.root.parent) as server:
        base = server.url + "store/"
        v = publish_box(store, "http-test", box, version="1.0.3", base_url=base)
        assert v.url.startswith("http://127.0.0.1:")
        vg.vagrant(["box", "add", "--provider", "libvirt", catalog_url(base, "http-test")], home=home)
    assert vg.box_list(home=home) == [("http-test", "libvirt", "1.0.3")]
    vg.box_remove("http-test", home=home)


# --- slow: vagrant up of the pinned builder -------------------------------------------------------


@dataclass(frozen=True)
class Published:
    name: str
    store: Path
    version: str
    env_digest: str
    box: BoxInfo
