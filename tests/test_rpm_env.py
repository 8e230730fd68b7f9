"""A whole rpm environment, end to end, from the suite's own signed yum repository served over
HTTP on 127.0.0.1: lock, build (twice, to the same digest), store, fetch, run, pin."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from envtools import Cli, leftovers
from yumrepo import HttpServer, YumRepo, make_gpg_key

from provision.lock import read_lock
from provision.store import LocalStore

SPEC = """\
name: toy
family: rpm
arch: x86_64
repos:
  - name: toy
    baseurl: {url}
    gpgkey: {key}
packages: [demo-tools]
groups:
  - name: mock
    gid: 135
users:
  - name: mockbuild
    uid: 1001
    gid: 135
    home: /builddir
files:
  - path: /etc/toy-release
    content: "toy 1\\n"
    mode: "0600"
    owner: 1001
    group: 135
exclude:
  - /usr/share/demo/b
forbidden:
  - android-*
"""


def write_spec(d: Path, url: str, key: str | None = None, **replace: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    text = SPEC.format(url=url, key=key or f"{url}RPM-GPG-KEY-provision-test")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = d / "toy.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def cli(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "store", tmp_path / "cache", capfd)


def test_lock_is_deterministic_and_complete(yum_repo: tuple[YumRepo, str], tmp_path: Path,
                                           cli: Cli) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url)
    cli("lock", str(spec))
    first = spec.with_suffix(".lock").read_bytes()
    cli("lock", str(spec))
    assert spec.with_suffix(".lock").read_bytes() == first
    lock = read_lock(spec.with_suffix(".lock"))
    names = {p.name for p in lock.packages}
    assert names == {"setup", "filesystem", "toybox", "demo-tools"}  # the whole closure
    for p in lock.packages:
        assert len(p.sha256) == 64 and p.size > 0 and p.path.endswith(".rpm") and p.source
    assert lock.keys and lock.source_date_epoch > 0
    # repos are recorded as the spec wrote them; packages by path within their repo
    assert [(r.name, r.baseurl) for r in lock.repos] == [("toy", url)]
    assert all("://" not in p.path for p in lock.packages)


def test_build_twice_same_digest_then_fetch_run_pin(yum_repo: tuple[YumRepo, str],
                                                    tmp_path: Path, cli: Cli,
                                                    capfd: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url)
    one = cli.json("build", str(spec))
    other = Cli(tmp_path / "store2", tmp_path / "cache2", capfd)
    two = other.json("build", str(spec))
    assert one["digest"] == two["digest"]
    assert one["digest"].startswith("sha256:") and one["size"] > 0 and one["name"] == "toy"
    assert one["tar_sha256"] == two["tar_sha256"]
    store = LocalStore(cli.store_path)
    assert store.has_blob(one["digest"]) and store.has_blob(one["lock_digest"])
    index = store.read_index()
    v = index.environments["toy"].version(one["digest"])
    assert v is not None and v.package_count == 4 and index.environments["toy"].tags["latest"]

    # fetch: verified, unpacked, and printed; the second time nothing happens
    got = cli.json("fetch", "toy")
    root = Path(got["root"])
    assert got["digest"] == one["digest"] and not got["cached"]
    assert cli.json("fetch", f"toy@{one['digest']}")["cached"]
    st = (root / "usr/bin/demo-suid").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (root / "usr/bin/demo-sgid").lstat().st_gid == 42
    assert os.getxattr(root / "usr/bin/demo-caps", "security.capability", follow_symlinks=False)
    assert stat.S_ISCHR((root / "usr/share/demo/null").lstat().st_mode)
    assert not (root / "usr/share/demo/b").exists()  # excluded
    rel = (root / "etc/toy-release").lstat()
    assert (rel.st_uid, rel.st_gid, stat.S_IMODE(rel.st_mode)) == (1001, 135, 0o600)
    assert "mockbuild:x:1001:135::/builddir:/bin/sh" in (root / "etc/passwd").read_text()
    assert not (root / "var/lib/rpm/rpmdb.sqlite-wal").exists()
    assert not (root / "var/cache/provision-dnf").exists()
    assert not list((root / "var/log").iterdir())

    # run: the tree at /work, a private /tmp, the exit code, and a pristine root afterwards
    work = tmp_path / "src"
    work.mkdir()
    (work / "hello.txt").write_text("from the host\n")
    monkeypatch.chdir(work)
    out, _ = cli("run", "toy", "--", "sh", "-c",
                 "pwd; cat hello.txt; id -u; echo made > /etc/scribble; ls /proc/self/fd >/dev/null"
                 " && echo proc; echo built > out.txt")
    assert out.split() == ["/work", "from", "the", "host", "0", "proc"]
    assert (work / "out.txt").read_text() == "built\n"
    assert not (root / "etc/scribble").exists()
    cli("run", "toy", "--", "sh", "-c", "exit 7", rc=7)
    _, err = cli("run", "toy", "--", "no-such-command", rc=127)
    assert "cannot run no-such-command" in err

    # pin: the tree names its environment; fetch and run without a REF read it
    out, _ = cli("pin", "toy")
    pin = (work / "provision.pin").read_text()
    assert one["digest"] in pin and str(cli.store) in pin
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")
    assert Cli(None, cli.cache, capfd).json("fetch")["digest"] == one["digest"]
    out, _ = cli("run", "--", "cat", "/etc/toy-release")
    assert out == "toy 1\n"

    listed = cli.json("list")
    assert listed["environments"]["toy"]["tags"]["latest"] == one["digest"]
    out, _ = cli("list")
    assert "toy" in out and one["digest"][:19] in out

    # the same store served read-only over HTTP is a store for consumers
    with HttpServer(cli.store_path) as srv:
        got2 = Cli(srv.url, tmp_path / "cache3", capfd).json("fetch", "toy")
        assert got2["digest"] == one["digest"] and Path(got2["root"]).is_dir()


def test_stale_lock_is_refused_until_relocked(yum_repo: tuple[YumRepo, str], tmp_path: Path,
                                              cli: Cli) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url)
    cli("lock", str(spec))
    spec.write_text(spec.read_text().replace("packages: [demo-tools]",
                                             "packages: [demo-tools, extra-tool]"))
    _, err = cli("build", str(spec), rc=1)
    assert "no longer matches" in err and "--relock" in err
    assert not (cli.store_path / "index.json").exists()
    got = cli.json("build", str(spec), "--relock")
    assert got["packages"] == 5


def test_forbidden_package_fails_the_lock(yum_repo: tuple[YumRepo, str], tmp_path: Path,
                                          cli: Cli) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url, **{"packages: [demo-tools]":
                                                 "packages: [demo-tools, android-sdk]"})
    _, err = cli("build", str(spec), rc=1)
    assert "forbidden packages would be included: android-sdk (matches 'android-*')" in err
    assert not spec.with_suffix(".lock").exists()
    assert not (cli.store_path / "index.json").exists()


def test_wrong_signing_key_fails_and_publishes_nothing(yum_repo: tuple[YumRepo, str],
                                                       tmp_path: Path, cli: Cli) -> None:
    repo, url = yum_repo
    keydir = tmp_path / "otherkey"
    keydir.mkdir()
    make_gpg_key(keydir / "gnupg", keydir / "home", "Other <other@test>", keydir / "KEY", "rsa2048")
    spec = write_spec(tmp_path / "spec", url, key=(keydir / "KEY").as_uri())
    _, err = cli("build", str(spec), rc=1)
    assert err.count("provision: error:") == 1 and "dnf failed: Error: GPG check FAILED" in err
    blobs = cli.store_path / "blobs"
    assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]
    assert not list((cli.cache / "work").iterdir())
    del repo


def test_opting_out_of_signatures_warns(yum_repo: tuple[YumRepo, str], tmp_path: Path,
                                        cli: Cli) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url, **{"    gpgkey: " + url + "RPM-GPG-KEY-provision-test":
                                                 "    gpgcheck: false"})
    _, err = cli("lock", str(spec))
    assert "warning" in err and "gpgcheck: false" in err


def test_unreachable_mirror_is_one_clear_line(tmp_path: Path, cli: Cli) -> None:
    spec = write_spec(tmp_path / "spec", "http://127.0.0.1:9/")
    _, err = cli("lock", str(spec), rc=1)
    assert err.startswith("provision: error: mirror unreachable: http://127.0.0.1:9")
    assert err.count("\n") == 1
    assert not spec.with_suffix(".lock").exists()


def test_corrupt_store_blob_is_refused_and_leaves_nothing(yum_repo: tuple[YumRepo, str],
                                                          tmp_path: Path, cli: Cli) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url)
    digest = cli.json("build", str(spec))["digest"]
    blob = cli.store_path / "blobs" / "sha256" / digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    _, err = cli("fetch", "toy", rc=1)
    assert "expected " + digest in err
    roots = cli.cache / "roots"
    assert not roots.exists() or not list(roots.iterdir())
    assert not leftovers(cli.cache)
    shutil.rmtree(cli.store_path)
    _, err = cli("fetch", "toy", rc=1)
    assert "no environment named 'toy'" in err


def test_fetched_root_is_the_built_root(yum_repo: tuple[YumRepo, str], tmp_path: Path,
                                        cli: Cli) -> None:
    """Owners, modes, xattrs/caps, hardlinks and devices survive archive -> store -> fetch."""
    from treeutil import snapshot

    from provision.build import build
    from provision.spec import load_spec
    from provision.store import open_store

    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url, **{"  - /usr/share/demo/b\n": "  - /nothing\n"})
    kept = tmp_path / "kept-root"
    result = build(load_spec(spec), open_store(str(cli.store_path)), cache_dir=cli.cache,
                   keep_root=kept)
    root = Path(cli.json("fetch", f"toy@{result.version.digest}")["root"])
    epoch = result.version.source_date_epoch
    built = {k: v._replace(mtime=min(v.mtime, epoch)) for k, v in snapshot(kept).items()}
    fetched = snapshot(root)
    assert fetched.keys() == built.keys()
    for path in built:
        assert fetched[path] == built[path], path
    assert "usr/share/demo/b" in built["usr/share/demo/a"].hardlinks


def test_package_that_does_not_match_its_lock_is_not_cached(yum_repo: tuple[YumRepo, str],
                                                            tmp_path: Path, cli: Cli) -> None:
    _repo, url = yum_repo
    spec = write_spec(tmp_path / "spec", url)
    cli("lock", str(spec))
    lock_path = spec.with_suffix(".lock")
    text = lock_path.read_text()
    good = read_lock(lock_path).packages[0].sha256
    lock_path.write_text(text.replace(good, "0" * 64))
    _, err = cli("build", str(spec), rc=1)
    assert f"expected sha256:{'0' * 64}, got sha256:{good}" in err
    cached = [p for p in (cli.cache / "packages").rglob("*") if p.is_file()]
    assert all(p.name != "0" * 64 for p in cached)
    assert not leftovers(cli.cache)
    assert not (cli.store_path / "index.json").exists()
