"""Consumer stage: run a command inside a fetched root.

The command runs in its own mount and pid namespaces (util-linux `unshare`), chrooted into a
writable overlay over the cached root, so the cached root stays pristine between runs. Inside:
/proc, a minimal /dev (null, zero, full, random, urandom, tty, pts, shm), a tmpfs /tmp, and the
current directory bind-mounted at /work (the working directory of the command).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from provision import run
from provision.errors import ProvisionError

WORK_MOUNT = "/work"
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "SHELL": "/bin/sh",
}
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
           "urandom": (1, 9), "tty": (5, 0)}


def enter(root: Path, argv: list[str], *, scratch_dir: Path, bind: Path | None = None,
          keep: Path | None = None) -> int:
    """Run argv in the root; returns its exit code. With `keep`, the overlay's upper layer
    (everything the command changed) is moved there instead of being discarded."""
    if os.geteuid() != 0:
        raise ProvisionError("`provision run` needs root (it mounts and chroots); try sudo")
    if not argv:
        raise ProvisionError("no command given (provision run REF -- CMD ...)")
    if not root.is_dir():
        raise ProvisionError(f"{root} is not a fetched root")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=scratch_dir))
    try:
        for d in ("upper", "work", "merged"):
            (tmp / d).mkdir()
        plan = {
            "root": str(root), "tmp": str(tmp), "argv": argv,
            "bind": str(bind) if bind else None, "term": os.environ.get("TERM", "dumb"),
        }
        proc = run.run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                        sys.executable, "-m", "provision.enter", json.dumps(plan)], check=False)
        if keep is not None:
            os.rename(tmp / "upper", keep)
        return proc.returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mount(*args: str) -> None:
    run.run(["mount", *args], capture=True)


def _inside(plan: dict[str, object]) -> None:
    """Runs as pid 1 of the new namespaces: mount, chroot, exec."""
    root, tmp = Path(str(plan["root"])), Path(str(plan["tmp"]))
    merged = tmp / "merged"
    _mount("-t", "overlay", "overlay", "-o",
           f"lowerdir={root},upperdir={tmp / 'upper'},workdir={tmp / 'work'}", str(merged))
    for d in ("proc", "dev", "tmp", "sys"):
        target = merged / d
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        target.mkdir(exist_ok=True)
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(merged / "proc"))
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", str(merged / "tmp"))
    dev = merged / "dev"
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", str(dev))
    for name, (major, minor) in DEVICES.items():
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)
    (dev / "pts").mkdir()
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620", "devpts", str(dev / "pts"))
    os.symlink("pts/ptmx", dev / "ptmx")
    (dev / "shm").mkdir(mode=0o1777)
    os.chmod(dev / "shm", 0o1777)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", dev / name)
    os.symlink("/proc/self/fd", dev / "fd")
    cwd = "/"
    if plan["bind"]:
        target = merged / WORK_MOUNT.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        _mount("--bind", str(plan["bind"]), str(target))
        cwd = WORK_MOUNT
    os.chroot(merged)
    os.chdir(cwd)
    env = {**ENV, "TERM": str(plan["term"])}
    argv = [str(a) for a in plan["argv"]]  # type: ignore[attr-defined]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"provision: error: cannot run {argv[0]} in the environment: {e.strerror}",
              file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    try:
        _inside(json.loads(sys.argv[1]))
    except ProvisionError as e:
        print(f"provision: error: {e}", file=sys.stderr)
        sys.exit(125)
