"""Fixtures of the validation suites: `target`, `host`, `host_glob`, `root_packages`, `env_lock`.

`provision validate` runs these suites; by hand (from the directory above validation/):

    pytest validation/test_common.py validation/test_bookworm_build.py \\
        --target chroot:///path/to/root --lock envs/bookworm-build.lock
    pytest validation/test_common.py --target ssh://root@127.0.0.1:2222 --ssh-identity KEY
    vagrant ssh-config > ssh_config
    pytest validation/test_common.py --target ssh-config:ssh_config     # Host `default`

Markers: `chroot_only` tests are deselected for ssh targets, `needs_lock` tests without --lock
(deselected, never skipped).
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import testinfra  # type: ignore[import-untyped]

from provision import run
from provision import validate as pv
from provision.errors import ProvisionError
from provision.validate import InstalledPackages, Target

TARGET = pytest.StashKey[Target]()
HOST = pytest.StashKey[Any]()  # testinfra.host.Host
LOCK = pytest.StashKey[dict[str, Any] | None]()
CONTROL_DIR = pytest.StashKey[Path]()
CONTROL_PERSIST = 30  # seconds an ssh master outlives its last use, should pytest die

GLOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_-.*?[]!")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("provision validation")
    g.addoption("--target", default=None,
                help="chroot:///ROOT, ssh://[user@]host[:port] or ssh-config:PATH[#HOST]")
    g.addoption("--ssh-identity", default=None, help="ssh private key for ssh targets")
    g.addoption("--known-hosts", default=None,
                help="check the host key against this file (default for ssh://: no check)")
    g.addoption("--lock", default=None, help="the environment's lock (JSON): check versions")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chroot_only: only for chroot targets (deselected otherwise)")
    config.addinivalue_line("markers", "needs_lock: needs --lock (deselected otherwise)")
    if config.option.help:
        return
    text = config.getoption("--target")
    if not text:
        raise pytest.UsageError("--target is required (chroot:///ROOT, ssh://[user@]host[:port] "
                                "or ssh-config:PATH)")
    try:
        config.stash[TARGET] = pv.parse_target(text)
    except ProvisionError as e:
        raise pytest.UsageError(str(e)) from None
    lock = config.getoption("--lock")
    if lock is None:
        config.stash[LOCK] = None
    else:
        try:
            config.stash[LOCK] = json.loads(Path(lock).read_text())
        except (OSError, ValueError) as e:
            raise pytest.UsageError(f"cannot read lock {lock}: {e}") from None


def make_host(target: Target, identity: str | None, known_hosts: str | None,
              control_path: Path | None = None) -> Any:
    """A testinfra host for the target: the chroot backend (chroot ROOT /bin/sh -c ...), or the
    ssh backend (the ssh client; with `control_path`, all commands share one connection)."""
    if target.kind == "chroot":
        return testinfra.get_host(str(target.root), connection="chroot")
    extra = shlex.join(pv.ssh_options(target, identity=Path(identity) if identity else None,
                                   known_hosts=Path(known_hosts) if known_hosts else None))
    kw: dict[str, Any] = {"ssh_extra_args": extra, "controlpersist": 0}
    if control_path is not None:
        kw.update(controlpersist=CONTROL_PERSIST, controlpath=str(control_path))
    if identity:
        kw["ssh_identity_file"] = identity
    if target.kind == "ssh-config":
        kw["ssh_config"] = str(target.ssh_config)
        return testinfra.get_host(f"ssh://{target.host}", **kw)
    host = f"[{target.host}]" if target.host and ":" in target.host else str(target.host)
    user = f"{target.user}@" if target.user else ""
    port = f":{target.port}" if target.port else ""
    return testinfra.get_host(f"ssh://{user}{host}{port}", **kw)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no error message"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Connect once before any test: an unreachable target is one clear error, not a failed row
    per test."""
    config = session.config
    target = config.stash[TARGET]
    control = None
    if target.kind != "chroot":
        control_dir = Path(tempfile.mkdtemp(prefix="validate-ssh-"))
        config.stash[CONTROL_DIR] = control_dir
        control = control_dir / "master"
    host = make_host(target, config.getoption("--ssh-identity"), config.getoption("--known-hosts"),
                     control)
    try:
        probe = host.run("true")
    except RuntimeError as e:  # the ssh backend: ssh itself failed (exit 255)
        result = e.args[0] if e.args else None
        why = _last_line(getattr(result, "stderr", "") or str(e))
        raise pytest.UsageError(f"cannot reach {target}: {why}") from None
    if probe.rc != 0:
        what = "run /bin/sh in" if target.kind == "chroot" else "run a command on"
        raise pytest.UsageError(f"cannot {what} {target}: {_last_line(probe.stderr)}")
    config.stash[HOST] = host


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the shared ssh connection (it would otherwise linger for CONTROL_PERSIST seconds)."""
    control_dir = config.stash.get(CONTROL_DIR, None)
    if control_dir is None:
        return
    if (control_dir / "master").exists():
        run.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={control_dir / 'master'}",
                 "-O", "exit", "validation-target"], check=False, capture=True)
    shutil.rmtree(control_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    target = config.stash[TARGET]
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        if (item.get_closest_marker("chroot_only") and target.kind != "chroot") or \
                (item.get_closest_marker("needs_lock") and config.stash[LOCK] is None):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def target(pytestconfig: pytest.Config) -> Target:
    return pytestconfig.stash[TARGET]


@pytest.fixture(scope="session")
def host(pytestconfig: pytest.Config) -> Any:
    """The testinfra host of --target (overrides testinfra's own `host` fixture)."""
    return pytestconfig.stash[HOST]


@pytest.fixture(scope="session")
def env_lock(pytestconfig: pytest.Config) -> dict[str, Any] | None:
    """The parsed lock JSON of --lock (packages: name, version, arch, ...), or None."""
    return pytestconfig.stash[LOCK]


@pytest.fixture(scope="session")
def host_glob(host: Any) -> Callable[[str], list[str]]:
    """pattern -> the existing paths it matches on the target (expanded by the target's sh)."""

    def glob(pattern: str) -> list[str]:
        if not pattern.startswith("/") or not set(pattern) <= GLOB_CHARS:
            raise ValueError(f"unsupported glob {pattern!r}")
        out: str = host.check_output(
            "for f in " + pattern + '; do if [ -e "$f" ] || [ -L "$f" ]; then '
            'printf "%s\\n" "$f"; fi; done')
        return [ln for ln in out.splitlines() if ln]

    return glob


@pytest.fixture(scope="session")
def root_packages(target: Target, host: Any, env_lock: dict[str, Any] | None
                  ) -> Callable[[str], str | None]:
    """name -> installed version (as the lock spells it) or None.

    A chroot's database is read from outside with the host's dpkg-query or rpm (the root needs
    neither); on an ssh target dpkg-query or rpm run on the machine itself."""
    family = env_lock.get("family") if env_lock else None
    installed: InstalledPackages
    if target.kind == "chroot":
        assert target.root is not None
        installed = pv.root_packages(target.root, family)
    elif family == "deb" or (family is None and host.exists("dpkg-query")):
        installed = pv.parse_dpkg(host.check_output("dpkg-query -W -f %s", pv.DPKG_FORMAT))
    elif family == "rpm" or host.exists("rpm"):
        installed = pv.parse_rpm(host.check_output("rpm -qa --qf %s", pv.RPM_FORMAT))
    else:
        pytest.fail("the target has neither dpkg-query nor rpm")

    def version(name: str) -> str | None:
        return installed.version(name)

    return version
