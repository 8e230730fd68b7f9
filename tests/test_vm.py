"""The builder image, end to end and shared: ONE Packer + Ansible build (under TCG here) of a
small deb environment serves every assertion below.

- the chroot cut from the image has the digest of the chroot built on the host;
- the testinfra suite passes against the chroot, the booted VM (over SSH) and the Vagrant box.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envtools import Cli
from vagrantutil import VagrantUp, libvirt  # noqa: F401  (a fixture)
from yumrepo import YumRepo

from provision import run
from provision.build import build
from provision.image import qemu_argv
from provision.spec import load_spec
from provision.store import LocalStore, open_store

pytestmark = [pytest.mark.mirror, pytest.mark.slow]

SPEC = """\
name: tiny-builder
family: deb
arch: amd64
repos:
  - name: debian
    baseurl: ${HOST_DEBIAN_MIRROR}
    suite: bookworm
    components: [main]
    keyring: /usr/share/keyrings/debian-archive-keyring.gpg
packages: [hello]
outputs: [chroot, qcow2, vagrant]
users:
  - name: builder
    uid: 1000
    home: /builds
exclude: [/usr/share/doc/*]
"""
SSH_WAIT = 300


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one VM build of this module (library call: capfd is per test)."""
    base = tmp_path_factory.mktemp("vm")
    spec = base / "spec" / "tiny-builder.yaml"
    spec.parent.mkdir()
    spec.write_text(SPEC)
    started = time.monotonic()
    result = build(load_spec(spec), open_store(str(base / "store")), cache_dir=base / "cache")
    print(f"\n[test_vm] build with VM outputs: {time.monotonic() - started:.0f} s")
    return {"digest": result.version.digest, "base": base, "spec": spec}


def test_chroot_cut_from_image_has_the_host_built_digest(built: dict[str, Any],
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    base: Path = built["base"]
    # the same environment without VM outputs, built on the host only
    host_spec = base / "host" / "tiny-builder.yaml"
    host_spec.parent.mkdir(exist_ok=True)
    host_spec.write_text(SPEC.replace("outputs: [chroot, qcow2, vagrant]\n", ""))
    host = Cli(base / "host-store", base / "cache", capfd).json("build", str(host_spec))
    assert host["digest"] == built["digest"]
    version = LocalStore(base / "store").read_index().environments["tiny-builder"].versions[0]
    assert set(version.artifacts) == {"qcow2", "vagrant", "ssh-key", "sbom", "spec"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def booted(disk: Path, key: Path, log: Path) -> Iterator[int]:
    port = _free_port()
    with log.open("wb") as out:
        proc = run.popen(qemu_argv(disk, ssh_port=port, snapshot=True),
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while True:
            res = run.run(["ssh", "-i", key, "-p", str(port), "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "ConnectTimeout=5", "builder@127.0.0.1", "true"],
                          capture=True, check=False)
            if res.returncode == 0:
                break
            assert proc.poll() is None, log.read_bytes()[-2000:].decode(errors="replace")
            assert time.monotonic() - started < SSH_WAIT, "no SSH"
            time.sleep(3)
        print(f"\n[test_vm] boot to SSH: {time.monotonic() - started:.0f} s")
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_validation_passes_on_chroot_and_booted_vm(built: dict[str, Any],
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    base: Path = built["base"]
    c = Cli(base / "store", base / "cache", capfd)
    out, _ = c("validate", "tiny-builder")
    assert "fail" not in out.lower().split("passed")[0] or " 0 failed" in out
    disk = Path(c.json("fetch", "tiny-builder", "--artifact", "qcow2")["path"])
    key = Path(c.json("fetch", "tiny-builder", "--artifact", "ssh-key")["path"])
    with booted(disk, key, base / "serial.log") as port:
        out, _ = c("validate", "tiny-builder", "--target", f"ssh://builder@127.0.0.1:{port}",
                   "--identity", str(key))
        # the machine itself has host keys (made at boot) and a machine-id: those checks are
        # for chroots only; every check that runs must pass
        assert "FAIL" not in out, out


@pytest.mark.usefixtures("libvirt")
def test_vagrant_up_from_the_catalog_and_validate_the_box(built: dict[str, Any], tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    base: Path = built["base"]
    c = Cli(base / "store", base / "cache", capfd)
    catalog = json.loads((base / "store" / "vagrant" / "tiny-builder.json").read_text())
    assert catalog["name"] == "tiny-builder"
    assert catalog["versions"][0]["providers"][0]["name"] == "libvirt"
    with VagrantUp(tmp_path, "tiny-builder", built["digest"], base / "store") as cfg:
        assert cfg["User"] == "builder"
        config = tmp_path / "ssh_config"
        config.write_text(run.output(["vagrant", "ssh-config"], cwd=tmp_path / "project",
                                     extra_env={"VAGRANT_HOME": str(tmp_path / "vagrant-home")}))
        out, _ = c("validate", "tiny-builder", "--target", f"ssh-config:{config}")
        assert "FAIL" not in out, out


RPM_SPEC = """\
name: toy-in-builder
family: rpm
arch: x86_64
repos:
  - name: toy
    baseurl: {url}
    gpgkey: {url}RPM-GPG-KEY-provision-test
packages: [demo-tools]
users:
  - name: mockbuild
    uid: 1001
"""
RPM_VM = """\
outputs: [chroot, qcow2]
vm:
  repos:
    - name: debian
      baseurl: ${HOST_DEBIAN_MIRROR}
      suite: bookworm
      components: [main]
      keyring: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_rpm_chroot_built_inside_a_deb_builder_has_the_host_built_digest(
        yum_repo: tuple[YumRepo, str], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """As mock does on a non-RHEL host: dnf in the Debian builder guest makes the rpm chroot."""
    _repo, url = yum_repo
    in_vm = tmp_path / "vm" / "toy.yaml"
    on_host = tmp_path / "host" / "toy.yaml"
    for path, text in ((in_vm, RPM_SPEC + RPM_VM), (on_host, RPM_SPEC)):
        path.parent.mkdir()
        path.write_text(text.replace("{url}", url))
    started = time.monotonic()
    vm = build(load_spec(in_vm), open_store(str(tmp_path / "store")), cache_dir=tmp_path / "cache")
    print(f"\n[test_vm] rpm chroot in a deb builder: {time.monotonic() - started:.0f} s")
    host = Cli(tmp_path / "host-store", tmp_path / "cache", capfd).json("build", str(on_host))
    assert vm.version.digest == host["digest"]
    assert set(vm.version.artifacts) == {"qcow2", "ssh-key", "sbom", "spec"}
