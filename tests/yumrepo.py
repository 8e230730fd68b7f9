"""Build a real, GPG-signed yum repository of tiny RPMs and serve it over HTTP.

Test helper: ``build_yum_repo(workdir)`` uses rpmbuild, gpg, rpmsign and createrepo_c to
produce a repository under ``workdir``; ``HttpServer`` serves a directory on 127.0.0.1.

Nothing here touches the real ``$HOME`` or ``~/.gnupg``: every rpm/rpmbuild/rpmsign/gpg call
runs with ``HOME`` and ``GNUPGHOME`` pointing at directories under ``workdir`` (Debian's rpm
macros would otherwise put an rpmdb in ``~/.rpmdb``).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "BUSYBOX_PATH",
    "GPG_KEY_FILENAME",
    "PACKAGES",
    "HttpServer",
    "YumRepo",
    "build_yum_repo",
    "make_gpg_key",
]

GPG_KEY_FILENAME = "RPM-GPG-KEY-provision-test"
GPG_KEY_UID = "Provision Test Signing Key <provision-test@example.invalid>"
BUSYBOX_PATH = Path("/bin/busybox")  # Debian package busybox-static
BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "id", "stat", "echo", "env", "true", "false",
    "mkdir", "touch", "rm", "uname", "test",
)  # fmt: skip


@dataclass(frozen=True)
class YumRepo:
    path: Path  # directory that holds the RPMs and repodata/
    gpgkey_path: Path  # ASCII-armoured public key file inside `path`
    packages: tuple[str, ...]  # names of the packages in the repo


@dataclass(frozen=True)
class _Package:
    name: str
    summary: str
    install: str  # body of %install (shell, run by rpmbuild)
    files: str  # body of %files
    requires: tuple[str, ...] = ()
    noarch: bool = True
    license: str = "MIT"
    sources: tuple[Path, ...] = ()


_SETUP = _Package(
    name="setup",
    summary="Users, groups and top-level directories",
    install="""\
install -d -m 0755 %{buildroot}/etc %{buildroot}/var %{buildroot}/proc %{buildroot}/sys \\
    %{buildroot}/dev %{buildroot}/home %{buildroot}/home/builder
install -d -m 0550 %{buildroot}/root
install -d -m 1777 %{buildroot}/tmp %{buildroot}/var/tmp
cat > %{buildroot}/etc/passwd <<'EOF'
root:x:0:0:root:/root:/usr/bin/sh
builder:x:1000:1000:builder:/home/builder:/usr/bin/sh
EOF
cat > %{buildroot}/etc/group <<'EOF'
root:x:0:
shadow:x:42:
builder:x:1000:
EOF
cat > %{buildroot}/etc/shadow <<'EOF'
root:*:19000:0:99999:7:::
builder:!:19000:0:99999:7:::
EOF
cat > %{buildroot}/etc/gshadow <<'EOF'
root:*::
shadow:*::
builder:!::
EOF
""",
    files="""\
%dir %attr(0755,root,root) /etc
%attr(0644,root,root) /etc/passwd
%attr(0644,root,root) /etc/group
%attr(0640,root,shadow) /etc/shadow
%attr(0640,root,shadow) /etc/gshadow
%dir %attr(0550,root,root) /root
%dir %attr(1777,root,root) /tmp
%dir %attr(0755,root,root) /var
%dir %attr(1777,root,root) /var/tmp
%dir %attr(0555,root,root) /proc
%dir %attr(0555,root,root) /sys
%dir %attr(0755,root,root) /dev
%dir %attr(0755,root,root) /home
%dir %attr(0700,builder,builder) /home/builder
""",
)

_FILESYSTEM = _Package(
    name="filesystem",
    summary="The /usr hierarchy and the merged-/usr symlinks",
    requires=("setup",),
    install="""\
install -d -m 0755 %{buildroot}/usr/bin %{buildroot}/usr/sbin %{buildroot}/usr/lib \\
    %{buildroot}/usr/lib64
ln -s usr/bin %{buildroot}/bin
ln -s usr/sbin %{buildroot}/sbin
ln -s usr/lib %{buildroot}/lib
ln -s usr/lib64 %{buildroot}/lib64
""",
    files="""\
%dir /usr
%dir /usr/bin
%dir /usr/sbin
%dir /usr/lib
%dir /usr/lib64
/bin
/sbin
/lib
/lib64
""",
)

_TOYBOX = _Package(
    name="toybox",
    summary="A static busybox as the root's shell and core utilities",
    requires=("filesystem",),
    noarch=False,
    license="GPL-2.0-only",
    sources=(BUSYBOX_PATH,),
    install="install -D -m 0755 %{SOURCE0} %{buildroot}/usr/bin/busybox\n"
    + "".join(f"ln -s busybox %{{buildroot}}/usr/bin/{a}\n" for a in BUSYBOX_APPLETS),
    files="%attr(0755,root,root) /usr/bin/busybox\n"
    + "".join(f"/usr/bin/{a}\n" for a in BUSYBOX_APPLETS),
)

_DEMO_TOOLS = _Package(
    name="demo-tools",
    summary="Files with special metadata: setuid/setgid, caps, hardlinks, devices",
    requires=("toybox",),
    install="""\
install -d -m 0755 %{buildroot}/usr/bin %{buildroot}/usr/share/demo %{buildroot}/home/builder
for f in demo-suid demo-sgid demo-caps; do
    printf '#!/usr/bin/sh\\necho %s\\n' "$f" > %{buildroot}/usr/bin/$f
    chmod 0755 %{buildroot}/usr/bin/$f
done
echo 'hardlinked demo file' > %{buildroot}/usr/share/demo/a
ln %{buildroot}/usr/share/demo/a %{buildroot}/usr/share/demo/b
ln -s a %{buildroot}/usr/share/demo/link
echo 'export PS1="builder$ "' > %{buildroot}/home/builder/.profile
""",
    files="""\
%attr(4755,root,root) /usr/bin/demo-suid
%attr(2755,root,shadow) /usr/bin/demo-sgid
%attr(0755,root,root) %caps(cap_net_raw=ep) /usr/bin/demo-caps
%dir /usr/share/demo
%attr(0644,root,root) /usr/share/demo/a
%attr(0644,root,root) /usr/share/demo/b
/usr/share/demo/link
%dev(c, 1, 3) %attr(0666,root,root) /usr/share/demo/null
%attr(0644,builder,builder) /home/builder/.profile
""",
)

_ANDROID_SDK = _Package(
    name="android-sdk",
    summary="Stand-in for a non-redistributable package",
    license="Proprietary",
    install="""\
install -d -m 0755 %{buildroot}/opt/android-sdk
echo 'Not redistributable. Test fixture only.' > %{buildroot}/opt/android-sdk/LICENSE
""",
    files="%attr(0644,root,root) /opt/android-sdk/LICENSE\n",
)

_EXTRA_TOOL = _Package(
    name="extra-tool",
    summary="A package that is in the repo but never requested",
    install="""\
install -d -m 0755 %{buildroot}/usr/bin
printf '#!/usr/bin/sh\\necho extra-tool\\n' > %{buildroot}/usr/bin/extra-tool
""",
    files="%attr(0755,root,root) /usr/bin/extra-tool\n",
)

_PACKAGES = (_SETUP, _FILESYSTEM, _TOYBOX, _DEMO_TOOLS, _ANDROID_SDK, _EXTRA_TOOL)
PACKAGES: tuple[str, ...] = tuple(p.name for p in _PACKAGES)


def _spec(pkg: _Package) -> str:
    lines = [
        "%global __os_install_post %{nil}",
        "%global debug_package %{nil}",
        "%global _build_id_links none",
        "%undefine _missing_build_ids_terminate_build",
        f"Name: {pkg.name}",
        "Version: 1.0",
        "Release: 1",
        f"Summary: {pkg.summary}",
        f"License: {pkg.license}",
        "AutoReqProv: no",
    ]
    if pkg.noarch:
        lines.append("BuildArch: noarch")
    lines += [f"Requires: {r}" for r in pkg.requires]
    lines += [f"Source{i}: {src.name}" for i, src in enumerate(pkg.sources)]
    lines += [
        "",
        "%description",
        f"{pkg.summary} (provision test fixture).",
        "",
        "%prep",
        "%build",
        "%install",
        pkg.install,
        "%files",
        "%defattr(-,root,root,-)",
        pkg.files,
    ]
    return "\n".join(lines)


def _run(argv: Sequence[str | os.PathLike[str]], env: dict[str, str]) -> str:
    """Run argv (never through a shell); return stdout, raise with the output on failure."""
    try:
        proc = subprocess.run(
            [os.fspath(a) for a in argv], check=True, env=env, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"command failed with exit status {exc.returncode}: {exc.cmd}\n"
            f"--- stdout ---\n{exc.stdout}\n--- stderr ---\n{exc.stderr}"
        ) from exc
    return proc.stdout


def _tool_env(home: Path, gnupghome: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(home),
        "GNUPGHOME": str(gnupghome),
        "LC_ALL": "C",
        "TZ": "UTC",
    }


def _check_static_elf(path: Path) -> None:
    """Refuse a missing or dynamically linked busybox: it would not run inside the root."""
    hint = "install Debian's static busybox: apt-get install -y busybox-static"
    if not path.is_file():
        raise RuntimeError(f"{path} not found; {hint}")
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeError(f"{path} is not a little-endian 64-bit ELF file; {hint}")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == pt_interp:
            raise RuntimeError(f"{path} is dynamically linked; {hint}")


def make_gpg_key(gnupghome: Path, home: Path, uid: str, out: Path, algo: str = "rsa3072") -> str:
    """Generate a passphrase-less signing key in `gnupghome`, export it armoured to `out`.

    Returns the key's fingerprint.
    """
    gnupghome.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    env = _tool_env(home, gnupghome)
    gpg = ["gpg", "--batch", "--no-tty", "--quiet"]
    try:
        _run([*gpg, "--pinentry-mode", "loopback", "--passphrase", "",
              "--quick-gen-key", uid, algo, "sign", "never"], env)  # fmt: skip
        colons = _run([*gpg, "--with-colons", "--list-secret-keys", uid], env)
        fprs = [ln.split(":")[9] for ln in colons.splitlines() if ln.startswith("fpr:")]
        if not fprs:
            raise RuntimeError(f"no fingerprint for freshly generated key {uid!r}:\n{colons}")
        _run([*gpg, "--armor", "--yes", "--output", out, "--export", fprs[0]], env)
    finally:
        _stop_gpg_agent(home, gnupghome)
    return fprs[0]


def _stop_gpg_agent(home: Path, gnupghome: Path) -> None:
    if shutil.which("gpgconf"):
        _run(["gpgconf", "--kill", "all"], _tool_env(home, gnupghome))


def build_yum_repo(workdir: Path) -> YumRepo:
    """Build, sign and index the test packages under `workdir`; return the repo description."""
    _check_static_elf(BUSYBOX_PATH)
    gpg_path = shutil.which("gpg")
    if gpg_path is None:
        raise RuntimeError("gpg not found on PATH")
    workdir = workdir.resolve()
    if any(c.isspace() for c in str(workdir)):
        raise ValueError(f"rpm macros cannot hold a path with whitespace: {workdir!s}")
    home = workdir / "home"
    gnupghome = workdir / "gnupg"
    topdir = workdir / "rpmbuild"
    repo_dir = workdir / "repo"
    source_dir = workdir / "source"
    for d in (home, topdir / "SOURCES", topdir / "SPECS", workdir / "tmp", repo_dir):
        d.mkdir(parents=True, exist_ok=True)
    env = _tool_env(home, gnupghome)

    # rpm reads ~/.rpmmacros; HOME is private so this also pins the rpmdb away from /root.
    (home / ".rpmmacros").write_text(
        f"%_topdir {topdir}\n"
        f"%_dbpath {home / 'rpmdb'}\n"
        f"%_tmppath {workdir / 'tmp'}\n"
        f"%__gpg {gpg_path}\n"
        f"%_gpg_path {gnupghome}\n"
        f"%_gpg_name {GPG_KEY_UID}\n"
        "%_gpg_digest_algo sha256\n"
    )

    gpgkey_path = repo_dir / GPG_KEY_FILENAME
    try:
        make_gpg_key(gnupghome, home, GPG_KEY_UID, gpgkey_path)

        rpms: list[Path] = []
        srpms: list[Path] = []
        for pkg in _PACKAGES:
            for src in pkg.sources:
                shutil.copy2(src, topdir / "SOURCES" / src.name)
            spec = topdir / "SPECS" / f"{pkg.name}.spec"
            spec.write_text(_spec(pkg))
            _run(["rpmbuild", "-ba", "--nodeps", "--quiet", "--target", "x86_64", spec], env)
            arch = "noarch" if pkg.noarch else "x86_64"
            rpm = topdir / "RPMS" / arch / f"{pkg.name}-1.0-1.{arch}.rpm"
            if not rpm.is_file():
                raise RuntimeError(f"rpmbuild did not produce {rpm}")
            rpms.append(Path(shutil.copy2(rpm, repo_dir / rpm.name)))
            srpm = topdir / "SRPMS" / f"{pkg.name}-1.0-1.src.rpm"
            if not srpm.is_file():
                raise RuntimeError(f"rpmbuild did not produce {srpm}")
            source_dir.mkdir(exist_ok=True)
            srpms.append(Path(shutil.copy2(srpm, source_dir / srpm.name)))

        _run(["rpmsign", "--addsign", *rpms, *srpms], env)
    finally:
        _stop_gpg_agent(home, gnupghome)

    # Sanity check: the signatures verify against the exported key (private rpmdb under HOME).
    _run(["rpmkeys", "--import", gpgkey_path], env)
    for rpm in rpms:
        out = _run(["rpmkeys", "--checksig", rpm], env)
        if "signatures OK" not in out:
            raise RuntimeError(f"{rpm.name} is not properly signed: {out.strip()}")

    _run(["createrepo_c", "--quiet", "--no-database", repo_dir], env)
    # The source packages (SRPMs), as a repository of their own at <repo>/source/.
    shutil.move(source_dir, repo_dir / "source")
    _run(["createrepo_c", "--quiet", "--no-database", repo_dir / "source"], env)
    return YumRepo(path=repo_dir, gpgkey_path=gpgkey_path, packages=PACKAGES)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpServer:
    """Serve `directory` on http://127.0.0.1:<ephemeral port>/ from a daemon thread.

    The socket is bound in ``__init__`` (so ``url`` is known at once); requests are served
    between ``__enter__`` and ``__exit__``, which stops the server and closes the socket.
    """

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url: str = f"http://{host!s}:{port}/"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HttpServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"HttpServer {self.url}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
