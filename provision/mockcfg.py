"""A mock configuration for an environment: mock gets the chroot from our verified archive
(its root cache), not by installing packages, so no network is needed to set it up.

The root cache plugin unpacks `<dir>/cache.tar<extension>` into a fresh buildroot instead of
running `chroot_setup_cmd`; with `age_check` off it never decides the cache is stale, and with
the bootstrap chroot off mock does not make a second chroot to install the first.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from provision.cache import default_cache_dir
from provision.download import download
from provision.errors import ProvisionError
from provision.fsutil import write_atomic
from provision.index import Ref, Version
from provision.spec import Family
from provision.store import Store

CACHE_NAME = "cache.tar.zst"


@dataclass(frozen=True)
class MockConfig:
    path: Path
    root: str  # mock's config_opts['root']
    cache_file: Path
    version: Version


def _py(s: str) -> str:
    return repr(s)


def render(name: str, version: Version, cache_dir: Path, *, arch: str, dnf_conf: str | None
           ) -> str:
    root = f"{name}-{version.digest.split(':')[1][:16]}"
    lines = [
        f"# mock configuration for {name}@{version.digest}",
        "# Written by `provision mock-config`: the chroot comes from the environment's verified",
        "# archive (mock's root cache), never from the network. Use: mock -r THIS_FILE ...",
        f"config_opts['root'] = {_py(root)}",
        f"config_opts['target_arch'] = {_py(arch)}",
        f"config_opts['legal_host_arches'] = ({_py(arch)},)",
        "config_opts['use_bootstrap'] = False",
        "config_opts['use_bootstrap_image'] = False",
        "config_opts['package_manager'] = 'dnf'",
        "# Nothing to install: the root cache below is the whole chroot.",
        "config_opts['chroot_setup_cmd'] = 'install'",
        "config_opts['plugin_conf']['root_cache_enable'] = True",
        "config_opts['plugin_conf']['root_cache_opts']['age_check'] = False",
        f"config_opts['plugin_conf']['root_cache_opts']['dir'] = {_py(str(cache_dir) + '/')}",
        "config_opts['plugin_conf']['root_cache_opts']['compress_program'] = 'zstd'",
        "config_opts['plugin_conf']['root_cache_opts']['decompress_program'] = 'zstd'",
        "config_opts['plugin_conf']['root_cache_opts']['extension'] = '.zst'",
        f"config_opts['macros']['%_provision_environment'] = {_py(name + '@' + version.digest)}",
    ]
    if dnf_conf is not None:
        lines.append(f"config_opts['dnf.conf'] = {_py(dnf_conf)}")
    return "\n".join(lines) + "\n"


def mock_config(ref: Ref, store: Store, out: Path | None = None, *,
                cache_dir: Path | None = None) -> MockConfig:
    from provision.stored import stored_spec

    _env, version = store.read_index().resolve(ref)
    if version.compression != "zstd":
        raise ProvisionError(f"{ref.name}@{version.digest} is {version.compression}-compressed; "
                             "mock's root cache here expects zstd (set compression: zstd)")
    dnf_conf = None
    arch = "x86_64"
    with tempfile.TemporaryDirectory(prefix="provision-mock-") as tmp:
        if "spec" in version.artifacts:
            spec = stored_spec(store, version, Path(tmp), ref.name)
            if spec.family is not Family.RPM:
                raise ProvisionError(f"{ref.name} is a {spec.family.value} environment; mock "
                                     "builds rpm packages in rpm environments")
            arch = spec.arch
            repos = "\n".join(
                f"[{r.name}]\nname={r.name}\nbaseurl={r.baseurl}\n"
                f"gpgcheck={1 if r.gpgcheck else 0}\n" for r in spec.repos)
            dnf_conf = f"[main]\nkeepcache=1\ninstall_weak_deps=0\n\n{repos}"
    base = (cache_dir or default_cache_dir()) / "mock" / \
        f"{ref.name}-{version.digest.split(':')[1][:16]}"
    cache_file = base / "root_cache" / CACHE_NAME
    if not cache_file.is_file():
        local = store.local_path(version.digest)
        src = local.as_uri() if local is not None else None
        if src is not None:
            download(src, cache_file, sha256=version.digest.split(":", 1)[1])
        else:
            store.get_blob(version.digest, cache_file, label=f"fetching {ref.name}")
    path = (out or Path(f"{ref.name}.cfg")).absolute()
    text = render(ref.name, version, cache_file.parent, arch=arch, dnf_conf=dnf_conf)
    try:
        write_atomic(path, text)
    except OSError as e:
        raise ProvisionError(f"cannot write {path}: {e.strerror}") from None
    root = f"{ref.name}-{version.digest.split(':')[1][:16]}"
    return MockConfig(path, root, cache_file, version)
