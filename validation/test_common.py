"""Checks every environment passes: a chroot, the booted VM, the Vagrant box.

`chroot_only` checks concern what a root must not carry into every copy made of it (a machine
booted from it may well have host keys and a machine id of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from provision.validate import locked_evr

Glob = Callable[[str], list[str]]


def _listing(paths: list[str], limit: int = 3) -> str:
    more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def test_root_is_uid_0(host: Any) -> None:
    passwd = host.file("/etc/passwd")
    assert passwd.is_file, "/etc/passwd is missing"
    rows = [ln.split(":") for ln in passwd.content_string.splitlines()]
    root = [r for r in rows if r[0] == "root"]
    assert root, "/etc/passwd has no root entry"
    uid = root[0][2] if len(root[0]) > 2 else "?"
    assert uid == "0", f"root has uid {uid} in /etc/passwd, not 0"


def test_shadow_is_not_world_readable(host: Any) -> None:
    shadow = host.file("/etc/shadow")
    if not shadow.exists:
        return  # no password hashes to leak (e.g. a root without the passwd package)
    uid, mode = shadow.uid, shadow.mode
    assert not mode & 0o004, f"/etc/shadow is world-readable (mode {mode:04o})"
    assert mode in (0o640, 0o600, 0o000), f"/etc/shadow has mode {mode:04o}, not 0640, 0600 or 0000"
    assert uid == 0, f"/etc/shadow is owned by uid {uid}, not 0"


@pytest.mark.chroot_only
def test_no_ssh_host_keys(host_glob: Glob) -> None:
    keys = host_glob("/etc/ssh/ssh_host_*")
    assert not keys, f"SSH host keys in the root (every copy would share them): {_listing(keys)}"


@pytest.mark.chroot_only
def test_machine_id_is_empty_or_absent(host: Any) -> None:
    machine_id = host.file("/etc/machine-id")
    if machine_id.exists:
        content = machine_id.content
        assert content == b"", f"/etc/machine-id is set ({content[:32]!r}): every copy would share it"


def test_no_apt_package_lists(host_glob: Glob) -> None:
    lists = host_glob("/var/lib/apt/lists/*_Packages") + host_glob("/var/lib/apt/lists/*_Packages.*")
    assert not lists, f"apt package lists left in /var/lib/apt/lists: {_listing(lists)}"


def test_no_dnf_cache(host_glob: Glob) -> None:
    cached = host_glob("/var/cache/dnf/*") + host_glob("/var/cache/dnf/.[!.]*")
    assert not cached, f"/var/cache/dnf is not empty: {_listing(cached)}"


def test_no_rpmdb_wal(host_glob: Glob) -> None:
    wal = host_glob("/var/lib/rpm/*-wal")
    assert not wal, f"rpmdb write-ahead log not checkpointed: {_listing(wal)}"


@pytest.mark.needs_lock
def test_installed_versions_match_lock(env_lock: dict[str, Any],
                                       root_packages: Callable[[str], str | None]) -> None:
    locked = env_lock["packages"]
    wrong = []
    for p in locked:
        want = locked_evr(p)
        got = root_packages(p["name"])
        if got != want:
            wrong.append(f"{p['name']} {got or 'not installed'} (locked {want})")
    assert not wrong, (f"{len(wrong)} of {len(locked)} locked packages differ: "
                       f"{_listing(wrong)}")
