"""A small deb environment from the Debian mirror apt on this machine is configured with:
the lock resolves the same bytes twice, the build gives the same digest twice, and a command
runs inside it."""

from __future__ import annotations

from pathlib import Path

import pytest
from envtools import Cli

from provision import run
from provision.lock import read_lock
from provision.spec import host_debian_mirror

pytestmark = pytest.mark.mirror
ANSIBLE = Path(__file__).resolve().parent.parent / "ansible"

SPEC = """\
name: tiny-bookworm
family: deb
arch: amd64
repos:
  - name: debian
    baseurl: ${HOST_DEBIAN_MIRROR}
    suite: bookworm
    components: [main]
    keyring: /usr/share/keyrings/debian-archive-keyring.gpg
packages: [hello, python3]
users:
  - name: builder
    uid: 1000
    home: /builds
exclude:
  - /usr/share/doc/*
  - /usr/share/man/*
forbidden: [android-sdk*]
"""


def test_deb_environment_is_reproducible(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_debian_mirror(), "apt on this machine names no Debian mirror"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    cli = Cli(tmp_path / "store", tmp_path / "cache", capfd)
    cli("lock", str(spec))
    first = spec.with_suffix(".lock").read_bytes()
    cli("lock", str(spec))
    assert spec.with_suffix(".lock").read_bytes() == first
    assert b"${HOST_DEBIAN_MIRROR}" in first  # the lock names no mirror host
    lock = read_lock(spec.with_suffix(".lock"))
    names = {p.name for p in lock.packages}
    assert {"hello", "dpkg", "libc6", "base-files", "bash"} <= names  # bootstrap included

    one = cli.json("build", str(spec))
    two = Cli(tmp_path / "store2", tmp_path / "cache", capfd).json("build", str(spec))
    assert one["digest"] == two["digest"]
    assert one["packages"] == len(lock.packages)

    root = Path(cli.json("fetch", "tiny-bookworm")["root"])
    shadow = (root / "etc/shadow").lstat()
    assert (shadow.st_uid, shadow.st_gid) == (0, 42)  # group shadow, never flattened
    assert not list((root / "usr/share/doc").iterdir())
    assert (root / "etc/machine-id").read_text() == "" if (root / "etc/machine-id").exists() \
        else True
    assert not list((root / "var/lib/apt/lists").glob("*_Packages"))
    monkeypatch.chdir(tmp_path)
    out, _ = cli("run", "tiny-bookworm", "--", "hello")
    assert out == "Hello, world!\n"
    out, _ = cli("run", "tiny-bookworm", "--", "sh", "-c", "id builder; ls -d /builds")
    assert "uid=1000(builder)" in out and "/builds" in out

    # the roles that configure a builder over SSH also run against a chroot directory
    copy = tmp_path / "chroot-copy"
    run.run(["cp", "-a", root, copy])
    env = {"ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg")}
    playbook: list[str | Path] = ["ansible-playbook", "-i", f"{copy},", ANSIBLE / "chroot.yml"]
    played = run.output(playbook, extra_env=env)
    assert "failed=0" in played
    assert (copy / "builds").stat().st_uid == 1000
    again = run.output(playbook, extra_env=env)
    assert "changed=0" in again and "failed=0" in again  # idempotent
