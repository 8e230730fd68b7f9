"""Consumers: `run --keep`, the streaming fetch over HTTP, the OCI image archive (loaded by
podman and skopeo, its filesystem compared with the chroot), and the mock config."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from envtools import Cli, leftovers
from test_rpm_env import write_spec
from treeutil import snapshot
from yumrepo import HttpServer, YumRepo

from provision.store import LocalStore


@pytest.fixture
def toy(yum_repo: tuple[YumRepo, str], tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> tuple[Cli, str]:
    """The toy rpm environment, built; returns the CLI and its digest."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    _repo, url = yum_repo
    cli = Cli(tmp_path / "store", tmp_path / "cache", capfd)
    digest = cli.json("build", str(write_spec(tmp_path / "spec", url)))["digest"]
    return cli, digest


def test_run_discards_or_keeps_its_upper_layer(toy: tuple[Cli, str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cli, _digest = toy
    monkeypatch.chdir(tmp_path)
    root = Path(cli.json("fetch", "toy")["root"])
    before = snapshot(root)
    change = "echo new > /etc/new-file; rm /etc/toy-release; mkdir -p /var/made"
    cli("run", "toy", "--", "sh", "-c", change)
    assert snapshot(root) == before  # the cached root stays pristine
    assert not list((cli.cache / "run").iterdir())  # nothing of the run is left

    kept = tmp_path / "kept"
    _out, err = cli("run", "toy", "--keep", str(kept), "--", "sh", "-c", change)
    assert str(kept) in err
    assert (kept / "etc/new-file").read_text() == "new\n"
    whiteout = (kept / "etc/toy-release").lstat()  # overlayfs records the deletion
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert (kept / "var/made").is_dir()
    assert snapshot(root) == before
    _out, err = cli("run", "toy", "--keep", str(kept), "--", "true", rc=1)
    assert "exists" in err  # never overwrites a kept layer


def test_streaming_fetch_over_http_is_verified(toy: tuple[Cli, str], tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    cli, digest = toy
    with HttpServer(cli.store_path) as server:
        remote = Cli(server.url, tmp_path / "remote-cache", capfd)
        got = remote.json("fetch", "toy")
        assert got["digest"] == digest and not got["cached"]
        local = Path(cli.json("fetch", "toy")["root"])
        assert snapshot(Path(got["root"])) == snapshot(local)
        # No copy of the archive was kept anywhere in the cache: only the root.
        files = [p for p in (tmp_path / "remote-cache").rglob("*") if p.is_file()]
        assert all(str(p).startswith(got["root"]) for p in files)

        # A blob whose bytes changed is refused, and nothing becomes visible.
        blob = cli.store_path / "blobs/sha256" / digest.split(":")[1]
        data = bytearray(blob.read_bytes())
        data[-100] ^= 0xFF  # near the end: most of the tree is extracted before it is noticed
        os.chmod(blob, 0o644)
        blob.write_bytes(bytes(data))
        cold = Cli(server.url, tmp_path / "cold-cache", capfd)
        _out, err = cold("fetch", "toy", rc=1)
        assert f"digest mismatch: expected {digest}" in err
        roots = tmp_path / "cold-cache" / "roots"
        assert not roots.exists() or not list(roots.iterdir())
        assert not leftovers(tmp_path / "cold-cache")


def podman_env(tmp_path: Path) -> dict[str, str]:
    """podman and skopeo with a private image store (vfs: works on any file system)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{tmp_path}/run"\n'
                    f'graphroot = "{tmp_path}/graph"\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}


def tool(*argv: str, env: dict[str, str]) -> str:
    return subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout


def test_oci_archive_loads_in_podman_and_skopeo(toy: tuple[Cli, str], tmp_path: Path) -> None:
    cli, digest = toy
    out = tmp_path / "toy.oci.tar"
    got = cli.json("oci", "toy", "--output", str(out))
    assert got["layer_digest"] == digest  # the chroot archive itself is the layer
    again = cli.json("oci", "toy", "--output", str(tmp_path / "again.oci.tar"))
    assert again["archive_digest"] == got["archive_digest"]  # deterministic
    index = LocalStore(cli.store_path).read_index()
    v = index.environments["toy"].version(digest)
    assert v is not None and v.artifacts["oci"] == got["archive_digest"]

    env = podman_env(tmp_path / "podman")
    # skopeo: the manifest digest and labels, and the layer blob is the chroot archive.
    inspect = json.loads(tool("skopeo", "inspect", f"oci-archive:{out}", env=env))
    assert inspect["Digest"] == got["manifest_digest"]
    assert inspect["Labels"]["org.provision.digest"] == digest
    assert inspect["Layers"] == [digest]
    tool("skopeo", "copy", "-q", f"oci-archive:{out}", f"dir:{tmp_path / 'dir'}", env=env)
    assert (tmp_path / "dir" / digest.split(":")[1]).read_bytes() == \
        (cli.store_path / "blobs/sha256" / digest.split(":")[1]).read_bytes()

    # podman: load it, and the image's filesystem is the chroot, entry by entry.
    loaded = tool("podman", "load", "-i", str(out), env=env)
    image = f"localhost/{got['image']}"
    assert image in loaded
    labels = json.loads(tool("podman", "image", "inspect", image, env=env))[0]["Labels"]
    assert labels["org.provision.lock-digest"] == v.lock_digest
    mounted = Path(tool("podman", "image", "mount", image, env=env).strip())
    try:
        root = Path(cli.json("fetch", "toy")["root"])
        image_tree, chroot = snapshot(mounted), snapshot(root)
        # The top directory is made by whoever unpacks (its mtime is theirs): all below it is equal.
        assert image_tree.pop(".").mode == chroot.pop(".").mode
        assert image_tree == chroot
    finally:
        tool("podman", "image", "unmount", image, env=env)
        tool("podman", "rmi", "-f", image, env=env)


def test_mock_config_points_at_the_verified_archive(toy: tuple[Cli, str], tmp_path: Path) -> None:
    cli, digest = toy
    cfg = tmp_path / "toy.cfg"
    got = cli.json("mock-config", "toy", "--output", str(cfg))
    # mock reads its configs as Python with a config_opts mapping: do the same.
    opts: dict[str, object] = {"plugin_conf": {"root_cache_opts": {}}, "macros": {}}
    exec(compile(cfg.read_text(), str(cfg), "exec"), {"config_opts": opts})  # noqa: S102
    plugin = opts["plugin_conf"]
    assert isinstance(plugin, dict)
    cache_opts = plugin["root_cache_opts"]
    assert plugin["root_cache_enable"] is True and cache_opts["age_check"] is False
    assert opts["use_bootstrap"] is False and opts["use_bootstrap_image"] is False
    assert opts["root"] == got["root"] == f"toy-{digest.split(':')[1][:16]}"
    cache = Path(cache_opts["dir"]) / f"cache.tar{cache_opts['extension']}"
    assert cache == Path(got["root_cache"])
    assert cache.read_bytes() == (cli.store_path / "blobs/sha256" / digest.split(":")[1]).read_bytes()
    assert "[toy]" in str(opts["dnf.conf"])
