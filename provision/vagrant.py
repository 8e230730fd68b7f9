"""Thin helpers around the `vagrant` command for the libvirt provider.

Vagrant is called through provision.run, like every other command, rather than through the
python-vagrant library: that library starts its own subprocesses (past this project's one
chokepoint, without its logging), raises subprocess.CalledProcessError with Vagrant's error message
lost unless a file is set up for stderr, and adds nothing the few calls here need.

Every call gets the same environment: VAGRANT_HOME (`home`, else $VAGRANT_HOME, else
~/.cache/provision/vagrant-home), VAGRANT_DEFAULT_PROVIDER=libvirt, LIBVIRT_DEFAULT_URI
qemu:///system, and no calls home (checkpoint, box update checks).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from provision import run
from provision.errors import CommandFailed, ProvisionError

log = logging.getLogger("provision.vagrant")

PROVIDER = "libvirt"


class VagrantError(ProvisionError):
    """A vagrant command failed."""


def vagrant_home(home: Path | None = None) -> Path:
    if home is not None:
        return home
    if os.environ.get("VAGRANT_HOME"):
        return Path(os.environ["VAGRANT_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "provision" / "vagrant-home"


def vagrant_env(env: Mapping[str, str] | None = None, *, home: Path | None = None) -> dict[str, str]:
    """The variables every vagrant call gets (on top of this process's environment), then `env`."""
    h = vagrant_home(home)
    return {
        "VAGRANT_HOME": str(h),
        "VAGRANT_DEFAULT_PROVIDER": PROVIDER,
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
        "LIBVIRT_DEFAULT_URI": "qemu:///system",
        **(env or {}),
    }


def vagrant(args: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            home: Path | None = None, output: IO[Any] | None = None) -> str:
    """Run `vagrant ARGS` and return its stdout (unless `output` takes it); a failure raises
    VagrantError with Vagrant's own message on one line."""
    extra = vagrant_env(env, home=home)
    home_dir = Path(extra["VAGRANT_HOME"])
    home_dir.mkdir(parents=True, exist_ok=True)
    where = f" in {cwd}" if cwd is not None else ""
    if cwd is None:  # not about a machine: keep clear of any Vagrantfile where this process is
        cwd = home_dir
    try:
        proc = run.run(["vagrant", *args, "--no-color"], capture=True, cwd=cwd, extra_env=extra,
                       stdout=output)
    except CommandFailed as e:
        what = " ".join(args[:2] if args[0] == "box" else args[:1])
        raise VagrantError(f"vagrant {what}{where} failed: {_one_line(e.stderr)}") from None
    return proc.stdout.decode(errors="replace") if isinstance(proc.stdout, bytes) else ""


def up(root: Path, env: Mapping[str, str] | None = None, *, home: Path | None = None,
       output: IO[Any] | None = None) -> None:
    """`vagrant up` of the Vagrantfile in `root` with the libvirt provider."""
    vagrant(["up", f"--provider={PROVIDER}"], cwd=root, env=env, home=home, output=output)


def ssh_config(root: Path, env: Mapping[str, str] | None = None, *,
               home: Path | None = None) -> dict[str, str]:
    """`vagrant ssh-config` as a dict (HostName, Port, User, IdentityFile, ...; first value wins)."""
    return parse_ssh_config(vagrant(["ssh-config"], cwd=root, env=env, home=home))


def destroy(root: Path, env: Mapping[str, str] | None = None, *, home: Path | None = None) -> None:
    """`vagrant destroy -f`: the machine and its disk (the box stays)."""
    vagrant(["destroy", "-f"], cwd=root, env=env, home=home)


def state(root: Path, env: Mapping[str, str] | None = None, *, home: Path | None = None) -> str:
    """The machine's state as Vagrant says it (running, shutoff, not_created, ...)."""
    out = vagrant(["status", "--machine-readable"], cwd=root, env=env, home=home)
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) >= 4 and fields[2] == "state":
            return fields[3]
    raise VagrantError(f"vagrant status in {root} named no state")


def box_remove(name: str, env: Mapping[str, str] | None = None, *, home: Path | None = None) -> None:
    """Remove every version of the box `name` (libvirt provider) from VAGRANT_HOME."""
    vagrant(["box", "remove", "--force", "--all", f"--provider={PROVIDER}", name], env=env, home=home)


def box_list(env: Mapping[str, str] | None = None, *, home: Path | None = None) -> list[tuple[str, str, str]]:
    """The boxes in VAGRANT_HOME as (name, provider, version)."""
    out = vagrant(["box", "list", "--machine-readable"], env=env, home=home)
    boxes: list[tuple[str, str, str]] = []
    name = provider = ""
    for line in out.splitlines():
        fields = line.split(",", 3)
        if len(fields) < 4:
            continue
        kind, value = fields[2], fields[3]
        if kind == "box-name":
            name = value
        elif kind == "box-provider":
            provider = value
        elif kind == "box-version" and name:
            boxes.append((name, provider, value))
    return boxes


def parse_ssh_config(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(\S+)\s+(.*?)\s*$", line)
        if not m or m[1].startswith("#"):
            continue
        key, value = m[1], m[2]
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        config.setdefault(key, value)
    if "HostName" not in config:
        raise VagrantError("vagrant ssh-config named no HostName")
    return config


def ssh_argv(config: Mapping[str, str], command: list[str] | None = None) -> list[str]:
    """An ssh command line that logs in as Vagrant does, from `ssh_config`'s dict."""
    argv = ["ssh", "-p", config.get("Port", "22"), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]
    if "IdentityFile" in config:
        argv += ["-i", config["IdentityFile"]]
    argv.append(f"{config.get('User', 'vagrant')}@{config['HostName']}")
    return argv + (command or [])


def _one_line(stderr: str) -> str:
    text = " ".join(stderr.split())
    return (text[:500] + "...") if len(text) > 500 else (text or "no message")
