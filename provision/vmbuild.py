"""The VM outputs of a build: base disk from the locked builder packages -> Packer + Ansible
(the chroot is built inside the guest from the same lock) -> qcow2 and Vagrant box -> the
chroot cut out of the image without booting it."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from provision import run
from provision.archive import ArchiveInfo, Compression
from provision.box import make_libvirt_box
from provision.cache import PackageCache
from provision.errors import ProvisionError
from provision.extract import extract_tree
from provision.fsutil import file_digest
from provision.image import Accel, kvm_usable, make_bootable_disk
from provision.lock import Lock
from provision.packer import ANSIBLE_DIR, CHROOTS_IN_GUEST, build_image, bundle
from provision.repo import make_repo_tree
from provision.rootfs import build_root
from provision.spec import Family, Output, Spec, Vm


@dataclass(frozen=True)
class VmResult:
    chroot: ArchiveInfo  # the chroot archive cut from the image
    artifacts: dict[str, tuple[str, Path]] = field(default_factory=dict)  # kind -> (digest, file)


def choose_accelerator(override: str | None = None) -> str:
    override = override or os.environ.get("PROVISION_ACCELERATOR")
    if override:
        if override not in (Accel.KVM.value, Accel.TCG.value):
            raise ProvisionError(f"accelerator {override!r} is not kvm or tcg")
        return override
    if kvm_usable():
        return Accel.KVM.value
    print("provision: KVM cannot run a guest here; using TCG (software emulation, slower)",
          file=sys.stderr)
    return Accel.TCG.value


def build_vm(spec: Spec, lock: Lock, cache: PackageCache, work: Path, *,
             accelerator: str | None = None) -> VmResult:
    vm = spec.vm or Vm()
    missing = [r for r in spec.guest.roles if not (ANSIBLE_DIR / "roles" / r).is_dir()]
    if missing:
        raise ProvisionError(f"{spec.path}: guest.roles: no such role in {ANSIBLE_DIR / 'roles'}: "
                             f"{', '.join(missing)}")
    accel = choose_accelerator(accelerator)
    # 1. the builder's root from its locked packages, made bootable
    vm_root = work / "vm-root"
    vm_tree = make_repo_tree(lock, cache, work / "vm-repo", lock.vm_packages, family=Family.DEB,
                             suite=lock.vm_suite)
    build_root(spec, lock, vm_tree.as_uri(), vm_root, work / "vm-work",
               packages=lock.vm_packages, configure=False, family=Family.DEB,
               suite=lock.vm_suite, arch=lock.vm_arch)
    key = work / "builder_key"
    run.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"provision-{spec.name}",
             "-f", key], capture=True)
    base = work / "base.qcow2"
    make_bootable_disk(vm_root, base, size_mib=vm.disk_mib, hostname=spec.name[:63],
                       authorized_key=(work / "builder_key.pub").read_text().strip(), user=vm.user)
    shutil.rmtree(vm_root)
    shutil.rmtree(vm_tree)
    # 2. Packer boots it and Ansible builds the chroot inside from packages served by the host
    http_dir = make_repo_tree(lock, cache, work / "http", lock.packages)
    extra_vars = {
        **spec.guest.vars_dict(),
        "provision_builder_user": vm.user,
        "provision_builder_packages": sorted({p.name for p in lock.vm_packages}),
        "provision_chroot_name": spec.name,
        "provision_chroot_root": CHROOTS_IN_GUEST,
        "provision_chroot_repo_url": "http://{{ packer_http_addr }}",
        "provision_chroot_bundle": str(bundle(spec, lock.to_json(), work / "bundle.tar.gz")),
        "provision_chroot_spec_name": spec.path.name,
        "provision_guest_roles": list(spec.guest.roles),
    }
    result = build_image(name=spec.name, base_image=base, base_checksum=file_digest(base),
                         key=key, work=work, extra_vars=extra_vars, accelerator=accel,
                         disk_size_mib=vm.disk_mib, memory_mib=vm.memory_mib, http_dir=http_dir,
                         user=vm.user, log_dir=cache.root.parent / "logs")
    base.unlink()
    # 3. the published chroot is the one inside the image, cut out without booting
    chroot = extract_tree(result.image, f"{CHROOTS_IN_GUEST}/{spec.name}", work / "vm-chroot",
                          source_date_epoch=lock.source_date_epoch,
                          compression=Compression(spec.compression), exclude=spec.exclude,
                          workdir=work)
    artifacts: dict[str, tuple[str, Path]] = {}
    if Output.QCOW2 in spec.outputs:
        artifacts["qcow2"] = (file_digest(result.image), result.image)
    if Output.VAGRANT in spec.outputs:
        # Made from the image here rather than by Packer's vagrant post-processor: the same
        # image always gives the same box (sorted, dated tar), with the builder's key inside.
        box = make_libvirt_box(result.image, work / f"{spec.name}.box", name=spec.name,
                               user=vm.user, private_key=key)
        artifacts["vagrant"] = (box.digest, box.path)
    # Like Vagrant's insecure key: what a laptop user logs in to the builder with. The key
    # never enters the chroot, which is what is published for builds.
    artifacts["ssh-key"] = (file_digest(key), key)
    return VmResult(chroot=chroot, artifacts=artifacts)
