"""Stage 5: local repository -> a populated, normalized root directory (host bootstrap).

deb: mmdebstrap from the flat local repository; rpm: dnf --installroot from per-origin local
repositories with the locked GPG keys. Then the spec's groups, users and files, then
normalization: nothing that differs between two builds of the same lock is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

from provision import run
from provision.cache import PackageCache
from provision.errors import CommandFailed, ProvisionError
from provision.lock import Lock, LockedPackage
from provision.repo import DEB_DIR, KEYS_DIR, RPM_DIR, make_repo_tree
from provision.spec import Family, Spec

SOURCES_NOTE = (
    "# This environment is frozen by its lock file: it installs nothing from the network.\n"
    "# Add a source here to install more, knowing that the result is no longer the locked one.\n"
)


class BuildError(ProvisionError):
    """The root could not be populated."""


def bootstrap(spec: Spec, lock: Lock, cache: PackageCache, root: Path, work: Path) -> None:
    """Populate the empty directory `root` from the cache, exactly with the locked packages."""
    tree = make_repo_tree(lock, cache, work / "repo", lock.packages)
    build_root(spec, lock, tree.as_uri(), root, work)


def build_root(spec: Spec, lock: Lock, repo_url: str, root: Path, work: Path, *,
               packages: tuple[LockedPackage, ...] | None = None, configure: bool = True,
               family: Family | None = None, suite: str | None = None,
               arch: str | None = None) -> None:
    """Populate `root` from a repository tree (see repo.make_repo_tree) at `repo_url`: a
    file:// URL on the host, or http:// when the host serves it to a builder guest. The same
    code runs in both places, so both give the same root."""
    pkgs = lock.packages if packages is None else packages
    family = family or lock.family
    env = {"SOURCE_DATE_EPOCH": str(lock.source_date_epoch), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    work.mkdir(parents=True, exist_ok=True)
    if family is Family.DEB:
        _bootstrap_deb(arch or lock.arch, suite or lock.suite, pkgs, repo_url, root, env)
    else:
        _bootstrap_rpm(spec, lock, pkgs, repo_url, root, work, env)
    check_installed(family, pkgs, root)
    if configure:
        apply_accounts(spec, root)
        apply_files(spec, root)
    normalize(root, lock.source_date_epoch)


def _err(e: CommandFailed, what: str) -> BuildError:
    lines = [ln for ln in e.stderr.splitlines() if ln.strip()]
    hint = next((ln for ln in reversed(lines) if ln.startswith(("E:", "Error", "error"))),
                lines[-1] if lines else "")
    return BuildError(f"{what} failed: {hint.strip() or e}")


def _bootstrap_deb(arch: str, suite: str | None, pkgs: tuple[LockedPackage, ...], repo_url: str,
                   root: Path, env: dict[str, str]) -> None:
    names = ",".join(p.name for p in pkgs)
    # mmdebstrap copies file:// packages into the root only when told to (copy://).
    url = "copy://" + repo_url.removeprefix("file://") if repo_url.startswith("file://") \
        else repo_url
    cmd: list[str | os.PathLike[str]] = [
        "mmdebstrap", "--mode=root", "--variant=essential", "--format=directory",
        f"--architectures={arch}", f"--include={names}",
        "--aptopt=Acquire::Languages \"none\"", "--quiet",
        suite or "stable", root, f"deb [trusted=yes] {url}/{DEB_DIR} ./",
    ]
    try:
        run.run(cmd, capture=True, extra_env=env)
    except CommandFailed as e:
        raise _err(e, "mmdebstrap") from None
    (root / "etc/apt/sources.list").write_text(SOURCES_NOTE)


# dnf puts its cache inside the installroot whatever we say: give it a path we then remove.
DNF_CACHE = "/var/cache/provision-dnf"
DNF_CONF = """\
[main]
gpgcheck=1
installonly_limit=0
install_weak_deps=False
keepcache=False
logdir=/var/log
"""


def _bootstrap_rpm(spec: Spec, lock: Lock, pkgs: tuple[LockedPackage, ...], repo_url: str,
                   root: Path, work: Path, env: dict[str, str]) -> None:
    reposd = work / "repos.d"
    reposd.mkdir(parents=True)
    verified = {r.name: r.gpgcheck for r in spec.repos}
    for name in sorted({p.repo for p in pkgs}):
        keys = [f"{repo_url}/{KEYS_DIR}/{k.sha256}" for k in lock.keys if k.repo == name]
        gpg = verified.get(name, True)
        if gpg and not keys:
            raise BuildError(f"repo {name} checks signatures but the lock has no key for it")
        lines = [f"[local-{name}]", f"name=local copy of {name}",
                 f"baseurl={repo_url}/{RPM_DIR}/{name}",
                 f"gpgcheck={1 if gpg else 0}", "repo_gpgcheck=0", "enabled=1"]
        if keys:
            lines.append("gpgkey=" + " ".join(keys))
        (reposd / f"{name}.repo").write_text("\n".join(lines) + "\n")
    (work / "dnf.conf").write_text(DNF_CONF)
    home = work / "home"
    home.mkdir()
    # Debian's rpm keeps its database in ~/.rpmdb unless told otherwise.
    (home / ".rpmmacros").write_text("%_dbpath /var/lib/rpm\n")
    root.mkdir(parents=True, exist_ok=True)
    cmd: list[str | os.PathLike[str]] = [
        "dnf", "-y", "-q", f"--installroot={root}", "-c", work / "dnf.conf",
        f"--setopt=reposdir={reposd}", f"--setopt=cachedir={DNF_CACHE}",
        f"--releasever={spec.releasever or '1'}", f"--forcearch={lock.arch}",
        "--disableplugin=*", "install",
        *(f"{p.name}-{p.evr}.{p.arch}" for p in pkgs),
    ]
    try:
        run.run(cmd, capture=True, extra_env={**env, "HOME": str(home)})
    except CommandFailed as e:
        raise _err(e, "dnf") from None
    _checkpoint_rpmdb(root)


def _checkpoint_rpmdb(root: Path) -> None:
    """Fold the sqlite write-ahead log into the rpmdb so no -wal/-shm file is left."""
    db = root / "var/lib/rpm/rpmdb.sqlite"
    if not db.exists():
        raise BuildError(f"dnf left no rpm database at {db}")
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    for leftover in ("rpmdb.sqlite-wal", "rpmdb.sqlite-shm"):
        (root / "var/lib/rpm" / leftover).unlink(missing_ok=True)


def installed(family: Family, root: Path) -> set[str]:
    """'name evr arch' of every package installed in the root, read from its own database."""
    if family is Family.DEB:
        out = run.output(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                          "-f", "${db:Status-Abbrev} ${Package} ${Version} ${Architecture}\n"])
        return {" ".join(ln.split()[1:]) for ln in out.splitlines() if ln.startswith("ii ")}
    out = run.output(["rpm", f"--root={root}", "--dbpath=/var/lib/rpm", "-qa", "--qf",
                      "%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE} %{ARCH}\n"])
    return {ln for ln in out.splitlines() if ln and not ln.startswith("gpg-pubkey ")}


def check_installed(family: Family, pkgs: tuple[LockedPackage, ...], root: Path) -> None:
    want = {p.line() for p in pkgs}
    got = installed(family, root)
    if want != got:
        extra = sorted(got - want)[:5]
        missing = sorted(want - got)[:5]
        raise BuildError(f"the root does not hold exactly the locked packages "
                         f"(missing: {missing or 'none'}; not in the lock: {extra or 'none'})")


# --------------------------------------------------------------------------- accounts and files

def _read_db(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [ln.split(":") for ln in path.read_text().splitlines() if ln.strip()]


def _write_db(path: Path, rows: list[list[str]], mode: int, gid: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    st = path.stat() if existed else None
    path.write_text("".join(":".join(r) + "\n" for r in rows))
    if st is not None:
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, st.st_mode & 0o7777)
    else:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, 0, gid)


def apply_accounts(spec: Spec, root: Path) -> None:
    etc = root / "etc"
    group = _read_db(etc / "group")
    gshadow = _read_db(etc / "gshadow")
    passwd = _read_db(etc / "passwd")
    shadow = _read_db(etc / "shadow")
    shadow_gid = next((int(r[2]) for r in group if r[0] == "shadow" and len(r) > 2), 0)

    def add_group(name: str, gid: int) -> None:
        for r in group:
            if r[0] == name:
                if int(r[2]) != gid:
                    raise BuildError(f"group {name} exists in the root with gid {r[2]}, not {gid}")
                return
            if int(r[2]) == gid:
                raise BuildError(f"gid {gid} is taken in the root by group {r[0]}")
        group.append([name, "x", str(gid), ""])
        gshadow.append([name, "!", "", ""])

    for g in spec.groups:
        add_group(g.name, g.gid)
    for u in spec.users:
        if not any(int(r[2]) == u.gid for r in group):
            add_group(u.name, u.gid)
        for r in passwd:
            if r[0] == u.name or int(r[2]) == u.uid:
                raise BuildError(f"user {u.name} (uid {u.uid}) clashes with {r[0]} in the root")
        passwd.append([u.name, "x", str(u.uid), str(u.gid), "", u.home, u.shell])
        shadow.append([u.name, "!", "0", "0", "99999", "7", "", "", ""])
        for gname in u.groups:
            row = next((r for r in group if r[0] == gname), None)
            if row is None:
                raise BuildError(f"user {u.name}: group {gname} does not exist in the root")
            members = [m for m in row[3].split(",") if m]
            row[3] = ",".join([*members, u.name])
        home = root / u.home.lstrip("/")
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, u.uid, u.gid)
        os.chmod(home, 0o755)
    if spec.groups or spec.users:
        _write_db(etc / "group", group, 0o644)
        _write_db(etc / "gshadow", gshadow, 0o640, shadow_gid)
        _write_db(etc / "passwd", passwd, 0o644)
        _write_db(etc / "shadow", shadow, 0o640, shadow_gid)


def _inside(root: Path, path: str) -> Path:
    """The host path of an in-root path, refusing to follow links out of the root."""
    target = root / path.lstrip("/")
    parent = target.parent.resolve()
    if not parent.is_relative_to(root.resolve()):
        raise BuildError(f"{path} would be written outside the root")
    return parent / target.name


def apply_files(spec: Spec, root: Path) -> None:
    for f in spec.files:
        target = _inside(root, f.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            raise BuildError(f"{f.path} is a link or directory in the root; cannot write it")
        target.write_bytes(f.content)
        os.chown(target, f.owner, f.group)
        os.chmod(target, f.mode)


# --------------------------------------------------------------------------- normalization

# Paths whose contents are removed (the directory itself stays).
EMPTIED = [
    "var/cache/apt", "var/cache/dnf", "var/cache/yum",
    "var/cache/ldconfig", "var/lib/apt/lists", "var/log", "var/tmp", "tmp", "run",
    "var/lib/dnf",
]
# Files removed outright.
REMOVED_GLOBS = [
    "var/lib/dbus/machine-id", "etc/ssh/ssh_host_*", "var/lib/systemd/random-seed",
    "var/lib/dpkg/*-old", "var/cache/debconf/*-old", "etc/*-", "var/lib/rpm/*-wal",
    "var/lib/rpm/*-shm", "var/lib/rpm/__db.*", "var/cache/man/*",
]


def _empty_dir(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            if child.name in ("partial", "archives") or path.name == "log":
                _empty_dir(child)  # keep the layout apt and daemons expect
                continue
            shutil.rmtree(child)
        else:
            child.unlink()


def normalize(root: Path, source_date_epoch: int) -> None:
    shutil.rmtree(root / DNF_CACHE.lstrip("/"), ignore_errors=True)
    for rel in EMPTIED:
        _empty_dir(root / rel)
    for pattern in REMOVED_GLOBS:
        for p in root.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()
    # apt hands its download dirs to _apt when it fetched over the network, not from copy://.
    for rel in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
        partial = root / rel
        if partial.is_dir() and not partial.is_symlink():
            os.chown(partial, 0, 0)
            os.chmod(partial, 0o700)
    # mmdebstrap copies the building host's name and resolver: neither belongs to the root.
    for name, text in (("etc/hostname", "localhost\n"), ("etc/resolv.conf", "")):
        path = root / name
        if path.is_symlink() or path.exists():
            path.unlink()
            path.write_text(text)
            os.chmod(path, 0o644)
    machine_id = root / "etc/machine-id"
    if machine_id.exists() and not machine_id.is_symlink():
        machine_id.write_text("")
    # The 'last password change' day is the build day unless pinned.
    day = str(source_date_epoch // 86400)
    for name in ("etc/shadow",):
        path = root / name
        if path.is_file() and not path.is_symlink():
            rows = _read_db(path)
            for r in rows:
                if len(r) > 2 and r[2] not in ("", "0"):
                    r[2] = day
            _write_db(path, rows, 0o640)


@contextlib.contextmanager
def scratch(work: Path) -> Iterator[Path]:
    """A scratch directory that is removed whatever happens."""
    work.mkdir(parents=True, exist_ok=True)
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="build-", dir=work))
    try:
        yield path
    finally:
        if os.environ.get("PROVISION_KEEP_WORK"):
            print(f"provision: kept {path} (PROVISION_KEEP_WORK)", file=sys.stderr)
        else:
            _rmtree(path)


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as e:
        print(f"provision: warning: could not remove {path}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python3 -m provision.rootfs`: the stage on its own, as the chroot role runs it inside a
    builder guest (packages served by the host at --repo-url)."""
    import argparse

    from provision.lock import read_lock
    from provision.spec import load_spec

    p = argparse.ArgumentParser(prog="provision.rootfs")
    p.add_argument("--spec", required=True, type=Path)
    p.add_argument("--lock", required=True, type=Path)
    p.add_argument("--repo-url", required=True)
    p.add_argument("--dest", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        lock = read_lock(args.lock)
        if not lock.matches(spec):
            raise BuildError(f"{args.lock} does not match {args.spec}")
        dest: Path = args.dest
        if dest.exists():
            raise BuildError(f"{dest} exists already")
        tmp = dest.with_name(f".{dest.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        with scratch(dest.parent / ".work") as work:
            build_root(spec, lock, args.repo_url.rstrip("/"), tmp, work)
        os.rename(tmp, dest)
    except ProvisionError as e:
        print(f"provision: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
