"""Stage: the builder machine with Packer + Ansible.

Python writes a var-file and an extra-vars file; packer/*.pkr.hcl holds the machine lifecycle;
ansible/ holds everything configured in the guest. Artifacts are read from Packer's manifest
post-processor, never from its output.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision import run
from provision.errors import CommandFailed, ProvisionError
from provision.spec import Spec

PROJECT = Path(__file__).resolve().parent.parent
PACKER_DIR = PROJECT / "packer"
ANSIBLE_DIR = PROJECT / "ansible"
TARGET_VARS = PACKER_DIR / "targets" / "deb-builder.pkrvars.hcl"
CHROOTS_IN_GUEST = "/var/lib/provision/chroots"


class PackerError(ProvisionError):
    """The Packer build failed."""


@dataclass(frozen=True)
class PackerResult:
    image: Path  # the builder's qcow2
    box: Path | None  # the Vagrant box (libvirt)
    manifest: Path
    log: Path


def hcl_value(value: object) -> str:
    """A JSON scalar is also an HCL literal (strings, numbers, booleans)."""
    return json.dumps(value)


def write_var_file(path: Path, variables: dict[str, object]) -> Path:
    path.write_text("".join(f"{k} = {hcl_value(v)}\n" for k, v in sorted(variables.items())))
    return path


def bundle(spec: Spec, lock_json: str, dest: Path) -> Path:
    """What the chroot role unpacks in the guest (one file: copying many over SSH is slow):
    the provision package, the spec with the files it names, and the lock."""
    pkg = Path(__file__).resolve().parent
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(pkg.rglob("*.py")):
            tar.add(path, f"provision/{path.relative_to(pkg)}", recursive=False)
        tar.add(spec.path, f"spec/{spec.path.name}", recursive=False)
        for source in spec.sources:
            tar.add(spec.path.parent / source, f"spec/{source}", recursive=False)
        info = tarfile.TarInfo("lock.json")
        data = lock_json.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return dest


def read_manifest(path: Path) -> tuple[Path, Path | None]:
    """The qcow2 and the box of the last run, from the manifest post-processors' records."""
    try:
        data = json.loads(path.read_text())
        run_uuid = data["last_run_uuid"]
        builds = [b for b in data["builds"] if b.get("packer_run_uuid") == run_uuid]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackerError(f"cannot read Packer's manifest {path}: {e}") from None
    image = box = None
    for b in builds:
        for f in b.get("files", []):
            name = Path(f["name"])
            if name.suffix == ".qcow2":
                image = name
            elif name.suffix == ".box":
                box = name
    if image is None:
        raise PackerError(f"Packer's manifest {path} names no qcow2 image")
    return image, box


def build_image(*, name: str, base_image: Path, base_checksum: str, key: Path, work: Path,
                extra_vars: dict[str, Any], accelerator: str, disk_size_mib: int,
                memory_mib: int, http_dir: Path, user: str, log_dir: Path) -> PackerResult:
    run.require("packer")
    run.require("ansible-playbook")
    out = work / "packer-out"
    manifest = work / "manifest.json"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"packer-{name}.log"
    out_log = log_dir / f"packer-{name}.out"
    extra = work / "extra-vars.json"
    extra.write_text(json.dumps(extra_vars, indent=1, sort_keys=True))
    var_file = write_var_file(work / "build.pkrvars.hcl", {
        "name": name,
        "base_image": str(base_image),
        "base_image_checksum": base_checksum,
        "output_dir": str(out),
        "accelerator": accelerator,
        "memory": memory_mib,
        "disk_size_mib": disk_size_mib,
        "ssh_username": user,
        "ssh_private_key_file": str(key),
        "http_directory": str(http_dir),
        "playbook": str(ANSIBLE_DIR / "site.yml"),
        "extra_vars_file": str(extra),
        "roles_path": str(ANSIBLE_DIR / "roles"),
        "manifest": str(manifest),
        "serial_log": str(log_dir / f"serial-{name}.log"),
    })
    env = {
        "CHECKPOINT_DISABLE": "1",
        "PACKER_CACHE_DIR": str(work / "packer-cache"),
        "PACKER_NO_COLOR": "1",
        "PACKER_LOG": "1",
        "PACKER_LOG_PATH": str(log),
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    print(f"provision: building the {name} builder image with Packer ({accelerator}); "
          f"log: {log}", file=sys.stderr)
    try:
        with out_log.open("wb") as stdout:
            run.run(["packer", "build", "-force", "-color=false", f"-var-file={TARGET_VARS}",
                     f"-var-file={var_file}", PACKER_DIR], extra_env=env, cwd=work,
                    stdout=stdout, stderr=stdout)
    except CommandFailed:
        tail = _last_error(out_log)
        raise PackerError(f"packer build failed: {tail} (see {out_log})") from None
    image, box = read_manifest(manifest)
    return PackerResult(image=image, box=box, manifest=manifest, log=log)


def _last_error(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "failed" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"
