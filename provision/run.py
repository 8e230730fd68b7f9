"""The one subprocess chokepoint. Every external command goes through here; never a shell."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from provision.errors import CommandFailed, ProvisionError

log = logging.getLogger("provision.run")

Arg = str | os.PathLike[str]


def _argv(cmd: Sequence[Arg]) -> list[str]:
    return [os.fspath(a) for a in cmd]


def require(tool: str) -> str:
    """Return the path of `tool`, or fail with a line that says how to get it."""
    path = shutil.which(tool)
    if path is None:
        raise ProvisionError(f"{tool} is not installed (run scripts/setup to install what provision needs)")
    return path


def _env(env: Mapping[str, str] | None, extra_env: Mapping[str, str] | None) -> dict[str, str] | None:
    if env is None and extra_env is None:
        return None
    base = dict(os.environ if env is None else env)
    base.update(extra_env or {})
    return base


def run(
    cmd: Sequence[Arg],
    *,
    check: bool = True,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: bytes | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command. With capture=True stdout and stderr are captured; a failure raises
    CommandFailed carrying the last line of stderr, and the whole command line is logged once."""
    argv = _argv(cmd)
    require(argv[0])
    log.debug("+ %s", shlex.join(argv))
    if capture:
        stdout = subprocess.PIPE if stdout is None else stdout
        stderr = subprocess.PIPE if stderr is None else stderr
    proc = subprocess.run(
        argv,
        env=_env(env, extra_env),
        cwd=cwd,
        input=input,
        stdout=stdout,
        stderr=stderr,
        check=False,
    )
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else ""
        log.debug("command failed (exit %d): %s", proc.returncode, shlex.join(argv))
        if err:
            log.debug("%s", err)
        raise CommandFailed(argv, proc.returncode, err)
    return proc


def output(cmd: Sequence[Arg], **kw: Any) -> str:
    """Run a command and return its stdout as text."""
    return run(cmd, capture=True, **kw).stdout.decode()


def popen(
    cmd: Sequence[Arg],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a command for a pipeline; the caller waits and calls check_returncode()."""
    argv = _argv(cmd)
    require(argv[0])
    log.debug("+ %s &", shlex.join(argv))
    return subprocess.Popen(
        argv, env=_env(env, extra_env), cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr
    )


def check_returncode(proc: subprocess.Popen[bytes], stderr_text: str = "") -> None:
    """Raise CommandFailed if a started command failed."""
    rc = proc.wait()
    if rc != 0:
        argv = _argv(proc.args if isinstance(proc.args, list) else [str(proc.args)])
        log.debug("command failed (exit %d): %s", rc, shlex.join(argv))
        raise CommandFailed(argv, rc, stderr_text)


def stop(procs: Sequence[subprocess.Popen[bytes]], pump: threading.Thread | None = None) -> None:
    """After a failure in a pipeline: kill what still runs, reap it, wait for the thread that
    pumped its pipes (their ends closed with the processes), then close the pipes."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    for proc in procs:
        proc.wait()
    if pump is not None:
        pump.join()
    for proc in procs:
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def execv(cmd: Sequence[Arg]) -> None:
    """Replace this process with a command (used after entering a chroot)."""
    argv = _argv(cmd)
    log.debug("exec %s", shlex.join(argv))
    os.execvp(argv[0], argv)
