"""libvirt as scripts/libvirtd leaves it, and vagrant up of a pinned environment's box."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision import run
from provision import vagrant as vg
from provision.pin import Pin, write_pin

REPO = Path(__file__).resolve().parent.parent
LIBVIRTD = REPO / "scripts" / "libvirtd"
URI = "qemu:///system"


@pytest.fixture(scope="module")
def libvirt() -> Iterator[None]:
    """libvirtd started by scripts/libvirtd; stopped again if it did not run before."""
    was_running = run.run(["virsh", "-c", URI, "uri"], check=False, capture=True).returncode == 0
    run.run([LIBVIRTD], capture=True)
    again = run.run([LIBVIRTD], capture=True)  # idempotent
    assert b"already answers" in again.stderr
    try:
        assert "default" in run.output(["virsh", "-c", URI, "pool-list", "--name"]).split()
        net = run.output(["virsh", "-c", URI, "net-dumpxml", "default"])
        assert "<forward" not in net, "the default network must not route anywhere"
        yield
    finally:
        if not was_running:
            run.run([LIBVIRTD, "stop"], capture=True)


def _virsh_quiet(*args: str) -> None:
    run.run(["virsh", "-c", URI, *args], check=False, capture=True)


class VagrantUp:
    """`vagrant up` of the top-level Vagrantfile in a project dir pinned to (name, digest, store);
    destroyed, and its box removed, on exit."""

    def __init__(self, work: Path, name: str, digest: str, store: Path) -> None:
        self.project = work / "project"
        self.project.mkdir(parents=True)
        shutil.copy(REPO / "Vagrantfile", self.project / "Vagrantfile")
        write_pin(Pin(name=name, digest=digest, store=str(store)), self.project / "provision.pin")
        self.serial = work / "serial-vagrant.log"
        self.env = {"VAGRANT_HOME": str(work / "vagrant-home"),
                    "PROVISION_VAGRANT_SERIAL_LOG": str(self.serial)}
        self.name = name
        self.log = work / "vagrant-up.log"

    def __enter__(self) -> dict[str, str]:
        started = time.monotonic()
        try:
            with self.log.open("wb") as log:
                vg.up(self.project, self.env, output=log)
        except vg.VagrantError as e:
            def tail(p: Path) -> str:
                return p.read_text(errors="replace")[-3000:] if p.exists() else "(none)"
            self.__exit__()
            pytest.fail(f"{e}\n--- vagrant up ---\n{tail(self.log)}\n--- serial ---\n{tail(self.serial)}")
        print(f"\n[vagrant] vagrant up (TCG): {time.monotonic() - started:.0f} s")
        assert vg.state(self.project, self.env) == "running"
        return vg.ssh_config(self.project, self.env)

    def __exit__(self, *exc: object) -> None:
        domain = f"{self.project.name}_default"
        try:
            vg.destroy(self.project, self.env)
        except vg.VagrantError:
            _virsh_quiet("destroy", domain)
            _virsh_quiet("undefine", domain, "--remove-all-storage")
        versions = [v for n, _p, v in vg.box_list(self.env) if n == self.name]
        with contextlib.suppress(vg.VagrantError):
            vg.box_remove(self.name, self.env)
        for v in versions:  # vagrant-libvirt's copy of box.img stays in the pool otherwise
            _virsh_quiet("vol-delete", "--pool", "default", f"{self.name}_vagrant_box_image_{v}_box.img")
