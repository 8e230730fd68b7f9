"""Validation: run the testinfra suites in validation/ against an environment and tabulate the result.

One suite per environment (the same test modules) runs against three kinds of target:

    chroot:///path/to/root       an unpacked root; commands run with chroot(8), package versions
                                 are read from the root's database from outside
    ssh://[user@]host[:port]     a booted machine (e.g. a VM with a forwarded port)
    ssh-config:PATH[#HOST]       a file like `vagrant ssh-config` prints (Host `default` unless
                                 #HOST says otherwise)

`validate` runs pytest in a subprocess over validation/test_common.py plus
validation/test_<env name>.py (if there is one), reads its JUnit XML and returns one row per test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import provision
from provision import run
from provision.errors import ProvisionError
from provision.rpmdb import query_rpmdb

TargetKind = Literal["chroot", "ssh", "ssh-config"]
Outcome = Literal["pass", "fail", "error", "skip"]

ENV_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MESSAGE_MAX = 200

# Package listings, one "name<TAB>arch<TAB>version" line per installed package.
DPKG_FORMAT = "${Package}\t${Architecture}\t${Version}\t${db:Status-Status}\n"
RPM_FORMAT = "%{NAME}\t%{ARCH}\t%|EPOCH?{%{EPOCH}}:{0}|\t%{VERSION}\t%{RELEASE}\n"


class ValidationError(ProvisionError):
    """Validation could not run (bad target, unreachable target, missing suites or tools)."""


# --------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    kind: TargetKind
    root: Path | None = None  # chroot
    host: str | None = None  # ssh: host name or address; ssh-config: the Host entry
    user: str | None = None  # ssh
    port: int | None = None  # ssh
    ssh_config: Path | None = None  # ssh-config

    def __str__(self) -> str:
        if self.kind == "chroot":
            return f"chroot://{self.root}"
        if self.kind == "ssh-config":
            return f"ssh-config://{self.ssh_config}#{self.host}"
        host = f"[{self.host}]" if self.host and ":" in self.host else str(self.host)
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{host}{port}"


def _strip_slashes(rest: str) -> str:
    """`//PATH` (URL style, PATH absolute) or `PATH`."""
    return rest[2:] if rest.startswith("//") else rest


def parse_target(text: str) -> Target:
    """chroot:PATH, chroot:///PATH, ssh://[user@]host[:port], ssh-config:PATH[#HOST]."""
    if text.startswith("chroot:"):
        rest = _strip_slashes(text[len("chroot:"):])
        if not rest:
            raise ValidationError(f"target {text!r} names no root directory")
        root = Path(rest).absolute()
        if not root.is_dir():
            raise ValidationError(f"target {text!r}: {root} is not a directory")
        return Target("chroot", root=root)
    if text.startswith("ssh-config:"):
        rest, _, host = _strip_slashes(text[len("ssh-config:"):]).partition("#")
        if not rest:
            raise ValidationError(f"target {text!r} names no ssh config file")
        path = Path(rest).absolute()
        if not path.is_file():
            raise ValidationError(f"target {text!r}: no ssh config file {path}")
        return Target("ssh-config", ssh_config=path, host=host or "default")
    if text.startswith("ssh://"):
        url = urllib.parse.urlsplit(text)
        try:
            port = url.port
        except ValueError:
            raise ValidationError(f"target {text!r} has a bad port") from None
        if not url.hostname or url.path not in ("", "/") or url.query or url.password:
            raise ValidationError(f"target {text!r} is not ssh://[user@]host[:port]")
        return Target("ssh", host=url.hostname, user=url.username or None, port=port)
    raise ValidationError(f"unknown target {text!r} (use chroot:///PATH, ssh://[user@]host[:port] "
                          f"or ssh-config:PATH)")


def ssh_options(target: Target, *, identity: Path | None = None,
                known_hosts: Path | None = None) -> list[str]:
    """The ssh options validation connects with (passed to testinfra's ssh backend)."""
    opts = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    if identity is not None:
        opts += ["-o", "IdentitiesOnly=yes"]
    if known_hosts is not None:
        opts += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
    elif target.kind == "ssh":
        # A throwaway VM on a forwarded port, like `vagrant ssh-config` configures it.
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    return opts


# --------------------------------------------------------------------------- package databases

@dataclass(frozen=True)
class InstalledPackages:
    """name -> [(arch, version)] of the packages installed in a root or on a machine."""

    family: Literal["deb", "rpm"]
    packages: Mapping[str, tuple[tuple[str, str], ...]]

    def version(self, name: str, arch: str | None = None) -> str | None:
        """The installed version of `name` (of that arch, if given), or None. Several
        different installed versions are returned joined with ", " (they match no lock)."""
        found = sorted({v for a, v in self.packages.get(name, ()) if arch is None or a == arch})
        return ", ".join(found) if found else None


def parse_dpkg(text: str) -> InstalledPackages:
    pkgs: dict[str, list[tuple[str, str]]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[3] == "installed":
            pkgs.setdefault(fields[0], []).append((fields[1], fields[2]))
    return InstalledPackages("deb", {k: tuple(v) for k, v in pkgs.items()})


def parse_rpm(text: str) -> InstalledPackages:
    pkgs: dict[str, list[tuple[str, str]]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 5 or fields[0] == "gpg-pubkey":
            continue
        name, arch, epoch, version, release = fields
        evr = f"{epoch}:" if epoch not in ("0", "(none)", "") else ""
        pkgs.setdefault(name, []).append((arch, f"{evr}{version}-{release}"))
    return InstalledPackages("rpm", {k: tuple(v) for k, v in pkgs.items()})


def root_family(root: Path) -> Literal["deb", "rpm"]:
    if (root / "var/lib/dpkg/status").is_file():
        return "deb"
    if (root / "var/lib/rpm").is_dir():
        return "rpm"
    raise ValidationError(f"{root} has neither a dpkg nor an rpm database")


def root_packages(root: Path, family: Literal["deb", "rpm"] | None = None) -> InstalledPackages:
    """Read the root's package database from outside, with the host's dpkg-query or rpm; the root
    needs neither tool, and is left untouched (rpm reads a copy of the database: rpm's sqlite
    leaves -wal/-shm files behind even for a query)."""
    family = family or root_family(root)
    if family == "deb":
        out = run.output(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", DPKG_FORMAT])
        return parse_dpkg(out)
    dbdir = root / "var/lib/rpm"
    if dbdir.is_symlink() or not dbdir.is_dir():
        raise ValidationError(f"{dbdir} is not a directory")
    return parse_rpm(query_rpmdb(dbdir, RPM_FORMAT, ValidationError))


def locked_evr(package: Mapping[str, Any]) -> str:
    """The version of one lock JSON package entry, spelled as the package databases spell it
    (as provision.lock.LockedPackage.evr: deb `version`; rpm `[epoch:]version-release`)."""
    release = package.get("release")
    if release is None:
        return str(package["version"])
    epoch = f"{package['epoch']}:" if package.get("epoch") else ""
    return f"{epoch}{package['version']}-{release}"


# --------------------------------------------------------------------------- running the suites

@dataclass(frozen=True)
class Row:
    test: str  # e.g. test_common::test_shadow_is_not_world_readable
    outcome: Outcome
    message: str  # one line; empty for a pass


@dataclass(frozen=True)
class Report:
    target: str
    environment: str
    suites: tuple[str, ...]  # the test modules that ran
    lock_checked: bool
    rows: tuple[Row, ...]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.outcome in ("pass", "skip") for r in self.rows)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.rows if r.outcome == outcome)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "environment": self.environment, "ok": self.ok,
                "suites": list(self.suites), "lock_checked": self.lock_checked,
                "rows": [dataclasses.asdict(r) for r in self.rows]}


def validation_dir() -> Path:
    """validation/ beside the provision package (a source checkout, or an install that ships it)."""
    d = Path(provision.__file__).resolve().parent.parent / "validation"
    if not (d / "conftest.py").is_file() or not (d / "test_common.py").is_file():
        raise ValidationError(f"the validation suites are not installed: no {d}/conftest.py "
                              f"(they live in validation/ beside the provision package)")
    return d


def env_module(env_name: str) -> str:
    return "test_" + re.sub(r"[^a-z0-9_]", "_", env_name) + ".py"


def suites_for(env_name: str, vdir: Path | None = None) -> tuple[str, ...]:
    if not ENV_NAME_RE.match(env_name):
        raise ValidationError(f"{env_name!r} is not an environment name")
    vdir = vdir or validation_dir()
    own = env_module(env_name)
    return ("test_common.py", own) if (vdir / own).is_file() else ("test_common.py",)


def _one_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for prefix in ("AssertionError: ", "Failed: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line if len(line) <= MESSAGE_MAX else line[:MESSAGE_MAX - 3] + "..."


_RANK: dict[Outcome, int] = {"pass": 0, "skip": 1, "fail": 2, "error": 3}
_TAGS: tuple[tuple[str, Outcome], ...] = (("error", "error"), ("failure", "fail"), ("skipped", "skip"))


def parse_junit(xml_text: str) -> tuple[Row, ...]:
    """One row per test case; a test that also errored in teardown keeps its worst outcome."""
    # Our own pytest wrote this file a moment ago: not untrusted input.
    tree = ET.fromstring(xml_text)  # noqa: S314
    rows: dict[str, Row] = {}
    for case in tree.iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        test = f"{module}::{case.get('name', '?')}" if module else case.get("name", "?")
        outcome: Outcome = "pass"
        message = ""
        for tag, what in _TAGS:
            el = case.find(tag)
            if el is not None:
                outcome = what
                message = _one_line(el.get("message") or el.text or "")
                break
        old = rows.get(test)
        if old is None or _RANK[outcome] > _RANK[old.outcome]:
            rows[test] = Row(test, outcome, message)
    return tuple(rows.values())


def _failure_line(stdout: str, stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("ERROR: "):  # a usage error: bad option, unreachable target
            return line[len("ERROR: "):].strip()
    for line in stdout.splitlines():
        if line.startswith("E   "):  # the exception of a collection error
            return line[1:].strip()
    for text in (stderr, stdout):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("=")]
        if lines:
            return lines[-1]
    return "no output"


def pytest_argv(target: Target, modules: Sequence[str], *, junit: Path, lock: Path | None,
                identity: Path | None, known_hosts: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "pytest", *modules, "--target", str(target),
            "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_logging=no", "-q",
            "--no-header", "-rN"]
    if identity is not None:
        argv += ["--ssh-identity", str(identity)]
    if known_hosts is not None:
        argv += ["--known-hosts", str(known_hosts)]
    if lock is not None:
        argv += ["--lock", str(lock)]
    return argv


def validate(target: str, env_name: str, *, lock: Path | None, identity: Path | None = None,
             known_hosts: Path | None = None) -> Report:
    """Run the validation suites of `env_name` against `target`; one row per test."""
    tgt = parse_target(target)
    for what, path in (("lock", lock), ("identity", identity), ("known hosts", known_hosts)):
        if path is not None and not path.is_file():
            raise ValidationError(f"no {what} file {path}")
    if tgt.kind == "chroot" and identity is not None:
        raise ValidationError("--identity is for ssh targets, not a chroot")
    if importlib.util.find_spec("testinfra") is None:
        raise ValidationError("pytest-testinfra is not installed (pip install pytest-testinfra)")
    vdir = validation_dir()
    modules = suites_for(env_name, vdir)
    pkg_parent = str(Path(provision.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="provision-validate-") as tmp:
        junit = Path(tmp) / "junit.xml"
        argv = pytest_argv(tgt, modules, junit=junit, lock=lock.absolute() if lock else None,
                           identity=identity.absolute() if identity else None,
                           known_hosts=known_hosts.absolute() if known_hosts else None)
        # No third-party pytest plugins: the suites need none (conftest.py drives testinfra
        # itself), and an installed one could change the outcome or write into validation/.
        proc = run.run(argv, check=False, capture=True, cwd=vdir,
                       extra_env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": pythonpath,
                                  "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        stdout = proc.stdout.decode(errors="replace")
        stderr = proc.stderr.decode(errors="replace")
        rows = parse_junit(junit.read_text()) if junit.is_file() else ()
    if proc.returncode not in (0, 1) or not rows:
        raise ValidationError(f"validation of {tgt} did not run: {_failure_line(stdout, stderr)}")
    return Report(str(tgt), env_name, modules, lock is not None, rows)


# --------------------------------------------------------------------------- output and CLI

_LABEL: dict[Outcome, str] = {"pass": "PASS", "fail": "FAIL", "error": "ERROR", "skip": "SKIP"}


def format_table(report: Report) -> str:
    width = max(len(r.test) for r in report.rows) if report.rows else 4
    lines = [f"{'RESULT':6}  {'TEST':{width}}  MESSAGE"]
    for r in report.rows:
        lines.append(f"{_LABEL[r.outcome]:6}  {r.test:{width}}  {r.message}".rstrip())
    words: tuple[tuple[Outcome, str], ...] = (
        ("pass", "passed"), ("fail", "failed"), ("error", "errors"), ("skip", "skipped"))
    counts = ", ".join(f"{report.count(o)} {word}" for o, word in words
                       if report.count(o) or o == "pass")
    lock = "" if report.lock_checked else "; no lock: package versions not checked"
    lines.append(f"{report.environment} on {report.target}: {counts}{lock}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _stored_lock(store: Any, lock_digest: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="provision-lock-") as tmp:
        path = Path(tmp) / "env.lock"
        store.get_blob(lock_digest, path)
        yield path


def cmd_validate(args: argparse.Namespace) -> int:
    """provision validate [REF] [--target chroot|chroot:///PATH|ssh://...|ssh-config:PATH]"""
    from provision.fetch import fetch, resolve_target
    from provision.index import parse_ref

    cache = Path(args.cache) if getattr(args, "cache", None) else None
    ref, store = resolve_target(parse_ref(args.ref) if args.ref else None, args.store,
                                getattr(args, "public_key", None))
    _env, version = store.read_index().resolve(ref)
    if args.target == "chroot":
        target = str(Target("chroot", root=fetch(ref, store, cache_dir=cache).root))
    else:
        target = args.target
    identity = Path(args.identity) if args.identity else None
    known_hosts = Path(args.known_hosts) if args.known_hosts else None
    with _stored_lock(store, version.lock_digest) as lock:
        report = validate(target, ref.name, lock=lock, identity=identity, known_hosts=known_hosts)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    else:
        print(format_table(report), end="")
    return 0 if report.ok else 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
               parents: Sequence[argparse.ArgumentParser] | None = None) -> None:
    """Add `validate` to the CLI's subcommands. Pass the CLI's common parent parser (--json,
    --store, --cache); without one the same three options are added here."""
    s = sub.add_parser("validate", parents=list(parents or ()),
                       help="run the testinfra validation suites against an environment")
    if parents is None:
        s.add_argument("--json", action="store_true", help="print one JSON object")
        s.add_argument("--store", default=None, help="store path or URL")
        s.add_argument("--cache", default=None, help="cache directory (default: ~/.cache/provision)")
    s.add_argument("ref", nargs="?", help="NAME, NAME:TAG or NAME@sha256:HEX (default: the pin)")
    s.add_argument("--target", default="chroot",
                   help="chroot (the fetched root, the default), chroot:///PATH, "
                        "ssh://[user@]host[:port] or ssh-config:PATH[#HOST] "
                        "(a file like `vagrant ssh-config` prints)")
    s.add_argument("--identity", default=None, help="ssh private key (ssh targets)")
    s.add_argument("--known-hosts", default=None,
                   help="check the ssh host key against this file (default for ssh:// targets: "
                        "no host key check, like `vagrant ssh-config`)")
    s.set_defaults(func=cmd_validate)
