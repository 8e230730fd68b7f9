"""`provision validate`: the testinfra suites in validation/ against a fetched chroot, a copy of it with
planted violations, and this very machine over ssh (a throwaway sshd on 127.0.0.1), plus a file
like `vagrant ssh-config` prints. Real builds, real chroots, real ssh: no mocks."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provision import run
from provision.cli import main
from provision.errors import ProvisionError
from provision.fetch import fetch
from provision.index import parse_ref
from provision.store import open_store
from provision.validate import (
    Report,
    Row,
    ValidationError,
    add_parser,
    format_table,
    parse_junit,
    parse_target,
    validate,
)

pytestmark = pytest.mark.mirror

NAME = "tiny-validate"
SPEC = f"""\
name: {NAME}
family: deb
arch: amd64
repos:
  - name: debian
    baseurl: ${{HOST_DEBIAN_MIRROR}}
    suite: bookworm
    components: [main]
    keyring: /usr/share/keyrings/debian-archive-keyring.gpg
packages: []
users:
  - name: builder
    uid: 1000
    home: /builds
exclude:
  - /usr/share/doc/*
  - /usr/share/man/*
"""

COMMON = {
    "test_common::test_root_is_uid_0",
    "test_common::test_shadow_is_not_world_readable",
    "test_common::test_no_ssh_host_keys",
    "test_common::test_machine_id_is_empty_or_absent",
    "test_common::test_no_apt_package_lists",
    "test_common::test_no_dnf_cache",
    "test_common::test_no_rpmdb_wal",
    "test_common::test_installed_versions_match_lock",
}
CHROOT_ONLY = {"test_common::test_no_ssh_host_keys", "test_common::test_machine_id_is_empty_or_absent"}
LOCK_ROW = "test_common::test_installed_versions_match_lock"


@dataclass(frozen=True)
class Env:
    store: Path
    cache: Path
    root: Path  # the fetched root: must stay untouched by validation


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    d = tmp_path_factory.mktemp("validate-env")
    spec = d / f"{NAME}.yaml"
    spec.write_text(SPEC)
    store, cache = d / "store", d / "cache"
    assert main(["build", "--store", str(store), "--cache", str(cache), str(spec)]) == 0
    got = fetch(parse_ref(NAME), open_store(str(store)), cache_dir=cache)
    return Env(store, cache, got.root)


def provision_validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`provision validate ARGS` as the CLI runs it (add_parser + cmd_validate, errors caught)."""
    parser = argparse.ArgumentParser(prog="provision")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["validate", *args])
    capsys.readouterr()
    try:
        rc: int = ns.func(ns)
    except ProvisionError as e:
        print(f"provision: error: {e}", file=sys.stderr)
        rc = 1
    out, err = capsys.readouterr()
    return rc, out, err


def outcomes(report: Report | dict[str, Any]) -> dict[str, str]:
    if isinstance(report, Report):
        return {r.test: r.outcome for r in report.rows}
    return {r["test"]: r["outcome"] for r in report["rows"]}


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, size and mtime (no symlinks followed)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            snap[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def test_fetched_chroot_passes_and_stays_untouched(env: Env, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    before = snapshot(env.root)
    rc, out, err = provision_validate(capsys, NAME, "--store", str(env.store),
                                      "--cache", str(env.cache))
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0].split() == ["RESULT", "TEST", "MESSAGE"]
    for test in COMMON:
        assert any(ln.split() == ["PASS", test] for ln in lines), out
    assert lines[-1].endswith(": 8 passed"), out
    assert f"{NAME} on chroot://{env.root}" in lines[-1]

    rc, out, _ = provision_validate(capsys, NAME, "--store", str(env.store),
                                    "--cache", str(env.cache), "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["ok"] is True and data["lock_checked"] is True
    assert data["suites"] == ["test_common.py"]
    assert outcomes(data) == dict.fromkeys(COMMON, "pass")
    assert snapshot(env.root) == before  # rpm/dpkg queries and chroot commands wrote nothing


def test_planted_violations_are_reported(env: Env, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    run.run(["cp", "-a", env.root, root])
    (root / "etc/ssh").mkdir(exist_ok=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("not really a key\n")
    os.chmod(root / "etc/shadow", 0o644)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/apt/lists/deb.example_dists_bookworm_main_binary-amd64_Packages").write_text("")
    status = root / "var/lib/dpkg/status"
    text = status.read_text()
    block = text.index("Package: base-files\n")
    version_at = text.index("\nVersion: ", block) + len("\nVersion: ")
    status.write_text(text[:version_at] + "0.0-planted" + text[text.index("\n", version_at):])

    rc, out, err = provision_validate(capsys, NAME, "--store", str(env.store), "--cache",
                                      str(env.cache), "--target", f"chroot://{root}")
    assert rc == 1, out + err
    rows = {ln.split()[1]: ln for ln in out.splitlines()[1:-1]}
    assert set(rows) == COMMON
    for test, words in (
        ("test_common::test_no_ssh_host_keys", ["/etc/ssh/ssh_host_rsa_key"]),
        ("test_common::test_shadow_is_not_world_readable", ["world-readable", "0644"]),
        ("test_common::test_machine_id_is_empty_or_absent", ["/etc/machine-id is set"]),
        ("test_common::test_no_apt_package_lists", ["deb.example_dists_bookworm"]),
        (LOCK_ROW, ["1 of", "base-files 0.0-planted (locked "]),
    ):
        assert rows[test].startswith("FAIL "), rows[test]
        for w in words:
            assert w in rows[test], rows[test]
    for test in ("test_common::test_root_is_uid_0", "test_common::test_no_dnf_cache",
                 "test_common::test_no_rpmdb_wal"):
        assert rows[test].split() == ["PASS", test]
    assert out.splitlines()[-1].endswith(": 3 passed, 5 failed"), out


def test_environment_module_is_selected_by_name(env: Env) -> None:
    target = f"chroot://{env.root}"
    own = validate(target, NAME, lock=None)
    assert own.suites == ("test_common.py",)
    assert not own.lock_checked and LOCK_ROW not in outcomes(own)  # deselected, not skipped
    assert own.ok and set(outcomes(own)) == COMMON - {LOCK_ROW}

    bb = validate(target, "bookworm-build", lock=None)
    assert bb.suites == ("test_common.py", "test_bookworm_build.py")
    got = outcomes(bb)
    for tool in ("gcc", "g++", "make", "git"):
        assert got[f"test_bookworm_build::test_tool_is_installed[{tool}]"] == "fail"
    assert got["test_bookworm_build::test_builder_user"] == "pass"  # the tiny spec has it too
    assert got["test_bookworm_build::test_motd_names_the_environment"] == "fail"
    msg = {r.test: r.message for r in bb.rows}
    assert msg["test_bookworm_build::test_tool_is_installed[gcc]"] == "gcc is not on PATH"
    assert not bb.ok
    table = format_table(bb)
    assert "FAIL    test_bookworm_build::test_gcc_runs" in table
    assert table.splitlines()[-1].endswith("; no lock: package versions not checked")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_unusable_targets_are_one_line_errors(env: Env, tmp_path: Path) -> None:
    cases = [
        ("ftp://example.invalid/", "unknown target"),
        (f"chroot://{tmp_path}/absent", "is not a directory"),
        (f"chroot://{tmp_path}", "cannot run /bin/sh in"),  # no shell in an empty root
        (f"ssh://root@127.0.0.1:{free_port()}", "Connection refused"),
        ("ssh://root@127.0.0.1:notaport", "bad port"),
    ]
    for target, words in cases:
        with pytest.raises(ValidationError) as e:
            validate(target, NAME, lock=None)
        assert words in str(e.value) and "\n" not in str(e.value), (target, str(e.value))
    with pytest.raises(ValidationError, match="not an environment name"):
        validate(f"chroot://{env.root}", "../etc", lock=None)
    with pytest.raises(ValidationError, match="no lock file"):
        validate(f"chroot://{env.root}", NAME, lock=tmp_path / "missing.lock")


def test_target_syntax() -> None:
    t = parse_target("ssh://vagrant@127.0.0.1:2222")
    assert (t.kind, t.user, t.host, t.port) == ("ssh", "vagrant", "127.0.0.1", 2222)
    assert str(t) == "ssh://vagrant@127.0.0.1:2222"
    assert parse_target("chroot:/").root == Path("/")
    assert parse_target("chroot:///").root == Path("/")
    assert parse_target(str(parse_target("chroot:///tmp"))).root == Path("/tmp")


def test_junit_rows_keep_the_worst_outcome() -> None:
    xml = """<testsuites><testsuite name="pytest">
      <testcase classname="test_common" name="test_a"/>
      <testcase classname="test_common" name="test_b">
        <failure message="AssertionError: bad mode 0644&#10;assert False">trace</failure></testcase>
      <testcase classname="test_common" name="test_b">
        <error message="failed on teardown with &quot;boom&quot;">trace</error></testcase>
    </testsuite></testsuites>"""
    assert parse_junit(xml) == (
        Row("test_common::test_a", "pass", ""),
        Row("test_common::test_b", "error", 'failed on teardown with "boom"'),
    )


# --------------------------------------------------------------------------- ssh targets

@dataclass(frozen=True)
class Sshd:
    port: int
    identity: Path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A throwaway sshd (openssh-server) on 127.0.0.1 letting root in with a fresh key."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    assert os.access(sshd_bin, os.X_OK), "sshd is not installed (apt-get install openssh-server)"
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        run.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "validate-test",
                 "-f", d / key])
    (d / "authorized_keys").write_bytes((d / "client_key.pub").read_bytes())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    log = (d / "sshd.log").open("wb")
    proc = run.popen([sshd_bin, "-D", "-e", "-f", "/dev/null", "-h", d / "host_key",
                      "-p", str(port), "-o", "ListenAddress=127.0.0.1",
                      "-o", f"AuthorizedKeysFile={d / 'authorized_keys'}",
                      "-o", "StrictModes=no", "-o", "UsePAM=no",
                      "-o", "PermitRootLogin=prohibit-password", "-o", f"PidFile={d / 'sshd.pid'}"],
                     stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"sshd exited: {(d / 'sshd.log').read_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "sshd did not start listening"
            time.sleep(0.1)
        yield Sshd(port, d / "client_key")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def host_expectations() -> dict[str, str]:
    """What test_common must find on this machine, read directly from its filesystem."""
    lists = Path("/var/lib/apt/lists")
    dnf = Path("/var/cache/dnf")
    shadow = os.stat("/etc/shadow")
    shadow_ok = shadow.st_uid == 0 and stat.S_IMODE(shadow.st_mode) in (0o640, 0o600, 0o000)
    return {
        "test_common::test_root_is_uid_0": "pass",
        "test_common::test_shadow_is_not_world_readable": "pass" if shadow_ok else "fail",
        "test_common::test_no_apt_package_lists":
            "fail" if list(lists.glob("*_Packages")) + list(lists.glob("*_Packages.*")) else "pass",
        "test_common::test_no_dnf_cache": "fail" if dnf.is_dir() and any(dnf.iterdir()) else "pass",
        "test_common::test_no_rpmdb_wal": "fail" if list(Path("/var/lib/rpm").glob("*-wal")) else "pass",
    }


def test_ssh_target_validates_this_machine(sshd: Sshd, tmp_path: Path) -> None:
    dpkg_version = run.output(["dpkg-query", "-W", "-f", "${Version}", "dpkg"])
    lock = tmp_path / "host.lock"
    lock.write_text(json.dumps({"family": "deb", "packages": [
        {"name": "dpkg", "version": dpkg_version, "arch": "amd64"},
        {"name": "bash", "version": "0.0-planted", "arch": "amd64"},
    ]}))
    report = validate(f"ssh://root@127.0.0.1:{sshd.port}", NAME, lock=lock, identity=sshd.identity)
    got = outcomes(report)
    assert not CHROOT_ONLY & set(got)  # a machine may have host keys and a machine id
    assert got == {**host_expectations(), LOCK_ROW: "fail"}
    msg = {r.test: r.message for r in report.rows}[LOCK_ROW]
    assert msg.startswith("1 of 2 locked packages differ: bash ") and "(locked 0.0-planted)" in msg


def test_ssh_config_target_like_vagrant(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"""\
Host default
  HostName 127.0.0.1
  User root
  Port {sshd.port}
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile {sshd.identity}
  IdentitiesOnly yes
  LogLevel FATAL
""")
    report = validate(f"ssh-config:{config}", NAME, lock=None)
    assert report.target == f"ssh-config://{config}#default"
    assert outcomes(report) == host_expectations()
