"""The served test repo (tests/yumrepo.py) installs into a root with real dnf and gpgcheck=1.

Runs Debian's dnf (``dnf`` from PATH, /usr/bin/python3) as root against the repo served over
HTTP on 127.0.0.1. Needs: rpm, rpmbuild, rpmsign, createrepo_c, gpg, dnf, busybox-static.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from yumrepo import GPG_KEY_FILENAME, YumRepo, make_gpg_key

REPO_ID = "provision-test"
REQUESTED = ("setup", "filesystem", "toybox", "demo-tools")


DNF_CONF = """\
[main]
gpgcheck=1
installonly_limit=3
install_weak_deps=False
skip_if_unavailable=False
best=True
keepcache=False
"""


@dataclass(frozen=True)
class Dnf:
    """A private dnf configuration (dnf.conf, reposdir, HOME with .rpmmacros)."""

    conf: Path
    reposdir: Path
    home: Path

    def env(self) -> dict[str, str]:
        # No PYTHON* variables leak in: /usr/bin/dnf runs on Debian's /usr/bin/python3.
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.home),
            "LC_ALL": "C.UTF-8",
        }

    def argv(self, root: Path, *args: str) -> list[str]:
        return [
            "dnf",
            "-c", str(self.conf),
            f"--installroot={root}",
            f"--setopt=reposdir={self.reposdir}",
            "--releasever=1",
            *args,
        ]  # fmt: skip

    def run(self, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(root, *args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def make_dnf(tmp: Path, base_url: str, gpgkey: str | None) -> Dnf:
    """Write dnf.conf, a reposdir with one repo (gpgcheck=1) and HOME/.rpmmacros under `tmp`."""
    home = tmp / "home"
    reposdir = tmp / "repos.d"
    home.mkdir(parents=True)
    reposdir.mkdir(parents=True)
    # Debian's rpm macros put the rpmdb in ~/.rpmdb (i.e. <root>/root/.rpmdb with --installroot).
    (home / ".rpmmacros").write_text("%_dbpath /var/lib/rpm\n")
    conf = tmp / "dnf.conf"
    conf.write_text(DNF_CONF)
    repo = [
        f"[{REPO_ID}]",
        "name=provision test repo",
        f"baseurl={base_url}",
        "enabled=1",
        "gpgcheck=1",
        "repo_gpgcheck=0",
    ]
    if gpgkey is not None:
        repo.append(f"gpgkey={gpgkey}")
    (reposdir / f"{REPO_ID}.repo").write_text("\n".join(repo) + "\n")
    return Dnf(conf=conf, reposdir=reposdir, home=home)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@dataclass(frozen=True)
class Installed:
    root: Path
    dnf: Dnf
    first: subprocess.CompletedProcess[str]  # the single `dnf install` transaction
    shadow_after_first: os.stat_result  # /etc/shadow right after that transaction
    reinstall: subprocess.CompletedProcess[str]  # `dnf reinstall setup`


@pytest.fixture(scope="module")
def installed(yum_repo: tuple[YumRepo, str], tmp_path_factory: pytest.TempPathFactory) -> Installed:
    _repo, url = yum_repo
    tmp = tmp_path_factory.mktemp("dnf-ok")
    dnf = make_dnf(tmp, url, gpgkey=url + GPG_KEY_FILENAME)
    root = tmp / "root"
    first = dnf.run(root, "install", "-y", *REQUESTED)
    assert first.returncode == 0, describe(first)
    shadow_after_first = os.lstat(root / "etc/shadow")
    # rpm 4.18 resolves all of a package's owner names before it writes any of its files, so
    # setup's own `%attr(..., shadow)` / `builder` fall back to root on a fresh root. A second
    # transaction (reinstall) sees the now-installed /etc/group and /etc/passwd.
    reinstall = dnf.run(root, "reinstall", "-y", "setup")
    assert reinstall.returncode == 0, describe(reinstall)
    return Installed(root, dnf, first, shadow_after_first, reinstall)


def test_repo_contents(yum_repo: tuple[YumRepo, str]) -> None:
    repo, url = yum_repo
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    assert repo.packages == (
        "setup", "filesystem", "toybox", "demo-tools", "android-sdk", "extra-tool"
    )  # fmt: skip
    assert repo.gpgkey_path == repo.path / GPG_KEY_FILENAME
    assert repo.gpgkey_path.read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert (repo.path / "repodata" / "repomd.xml").is_file()
    rpms = sorted(p.name for p in repo.path.glob("*.rpm"))
    assert len(rpms) == len(repo.packages)


def test_install_with_gpgcheck_over_http(installed: Installed) -> None:
    out = installed.first.stdout + installed.first.stderr
    assert "Key imported successfully" in out
    assert "Complete!" in installed.first.stdout


def test_first_transaction_cannot_use_groups_from_same_package(installed: Installed) -> None:
    """Pins rpm 4.18 behaviour: names defined by a package can't own that package's files."""
    out = installed.first.stdout + installed.first.stderr
    assert "group shadow does not exist - using root" in out
    assert installed.shadow_after_first.st_gid == 0


def test_installed_root_metadata(installed: Installed) -> None:
    root = installed.root

    suid = os.lstat(root / "usr/bin/demo-suid")
    assert stat.S_IMODE(suid.st_mode) == 0o4755
    assert (suid.st_uid, suid.st_gid) == (0, 0)

    sgid = os.lstat(root / "usr/bin/demo-sgid")
    assert stat.S_IMODE(sgid.st_mode) == 0o2755
    assert sgid.st_gid == 42

    for name in ("shadow", "gshadow"):
        st = os.lstat(root / "etc" / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 42, 0o640), name

    assert os.getxattr(root / "usr/bin/demo-caps", "security.capability")

    a = os.lstat(root / "usr/share/demo/a")
    b = os.lstat(root / "usr/share/demo/b")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert os.readlink(root / "usr/share/demo/link") == "a"

    null = os.lstat(root / "usr/share/demo/null")
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)

    for path in ("home/builder", "home/builder/.profile"):
        st = os.lstat(root / path)
        assert (st.st_uid, st.st_gid) == (1000, 1000), path

    for path, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o550)):
        assert stat.S_IMODE(os.lstat(root / path).st_mode) == mode, path

    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):  # fmt: skip
        assert os.readlink(root / link) == target
    assert os.readlink(root / "usr/bin/sh") == "busybox"

    assert (root / "var/lib/rpm/rpmdb.sqlite").is_file()
    assert not (root / "root/.rpmdb").exists()
    # Present in the repo but not requested.
    assert not (root / "opt/android-sdk").exists()
    assert not (root / "usr/bin/extra-tool").exists()


def test_chroot_shell_works(installed: Installed) -> None:
    proc = subprocess.run(
        ["chroot", str(installed.root), "/usr/bin/sh", "-c", "echo ok"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "ok\n"


def test_rpmdb_lists_packages_and_verifies(installed: Installed) -> None:
    env = installed.dnf.env()
    root = str(installed.root)
    qa = subprocess.run(
        ["rpm", "--root", root, "-qa", "--qf", "%{NAME}\n"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    names = set(qa.stdout.split())
    assert names == {*REQUESTED, "gpg-pubkey"}
    verify = subprocess.run(
        ["rpm", "--root", root, "-Va"], env=env, capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, describe(verify)


def test_preseeded_passwd_group_fixes_ownership_in_one_transaction(
    yum_repo: tuple[YumRepo, str], tmp_path: Path
) -> None:
    """Alternative to the reinstall: write /etc/passwd and /etc/group before the transaction."""
    _repo, url = yum_repo
    dnf = make_dnf(tmp_path, url, gpgkey=url + GPG_KEY_FILENAME)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/usr/bin/sh\nbuilder:x:1000:1000::/home/builder:/usr/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nshadow:x:42:\nbuilder:x:1000:\n")
    proc = dnf.run(root, "install", "-y", *REQUESTED)
    assert proc.returncode == 0, describe(proc)
    assert "does not exist - using root" not in proc.stdout + proc.stderr
    shadow = os.lstat(root / "etc/shadow")
    assert (shadow.st_uid, shadow.st_gid) == (0, 42)


def assert_gpg_failure(proc: subprocess.CompletedProcess[str], root: Path) -> None:
    assert proc.returncode != 0, describe(proc)
    assert "Complete!" not in proc.stdout
    assert not (root / "usr/bin/busybox").exists()
    assert not (root / "etc/passwd").exists()


def test_gpgcheck_without_key_fails(yum_repo: tuple[YumRepo, str], tmp_path: Path) -> None:
    _repo, url = yum_repo
    dnf = make_dnf(tmp_path, url, gpgkey=None)
    root = tmp_path / "root"
    proc = dnf.run(root, "install", "-y", *REQUESTED)
    assert_gpg_failure(proc, root)
    assert "you do not have any GPG public keys installed" in proc.stdout + proc.stderr


def test_gpgcheck_with_wrong_key_fails(yum_repo: tuple[YumRepo, str], tmp_path: Path) -> None:
    _repo, url = yum_repo
    wrong = tmp_path / "RPM-GPG-KEY-wrong"
    make_gpg_key(tmp_path / "gnupg", tmp_path / "gpg-home", "Wrong Key <wrong@example.invalid>",
                 wrong, algo="rsa2048")  # fmt: skip
    dnf = make_dnf(tmp_path, url, gpgkey=wrong.as_uri())
    root = tmp_path / "root"
    proc = dnf.run(root, "install", "-y", *REQUESTED)
    assert_gpg_failure(proc, root)
    assert "GPG" in proc.stdout + proc.stderr
