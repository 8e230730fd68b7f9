"""The S3 store, against moto's server on 127.0.0.1 (a real HTTP endpoint, no patched clients):
publish a built environment to a bucket, fetch it back over plain HTTP from another process with
no AWS credentials, concurrent publishers, multipart blobs, and signed indexes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from envtools import Cli
from motoserver import client, new_bucket
from test_rpm_env import write_spec
from treeutil import snapshot
from yumrepo import YumRepo

from provision.errors import DigestMismatch, StoreError
from provision.fsutil import file_digest
from provision.index import Index, Version
from provision.s3 import PART_SIZE, S3Store
from provision.signing import SignatureError, generate_key


def s3_url(endpoint: str, bucket: str, prefix: str = "envs") -> str:
    return f"s3://{bucket}/{prefix}?endpoint={endpoint}"


def public_url(endpoint: str, bucket: str, prefix: str = "envs") -> str:
    return f"{endpoint}/{bucket}/{prefix}/"


def no_aws_env(home: Path) -> dict[str, str]:
    """A consumer's environment: no AWS credentials, config or endpoint anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env.pop("PROVISION_STORE", None)
    return env


def provision(*args: str, env: dict[str, str], rc: int = 0) -> subprocess.CompletedProcess[str]:
    """The CLI in a second process."""
    got = subprocess.run([sys.executable, "-m", "provision.cli", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == rc, f"provision {' '.join(args)} exited {got.returncode}:\n{got.stderr}"
    return got


def version(n: int) -> Version:
    return Version(digest="sha256:" + f"{n:064x}", created="2026-01-01T00:00:00Z",
                   lock_digest="sha256:" + "0" * 64, size=n, tar_sha256="0" * 64, tar_size=n,
                   compression="zstd", source_date_epoch=0, packages=())


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ~/.config (no signing key unless a test makes one)."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("PROVISION_SIGNING_KEY", raising=False)
    monkeypatch.delenv("PROVISION_PUBLIC_KEY", raising=False)
    return home


@pytest.fixture
def built(yum_repo: tuple[YumRepo, str], tmp_path: Path, capfd: pytest.CaptureFixture[str],
          config_home: Path) -> Cli:
    """The toy rpm environment built into a local store."""
    _repo, url = yum_repo
    cli = Cli(tmp_path / "local", tmp_path / "cache", capfd)
    cli("build", str(write_spec(tmp_path / "spec", url)))
    return cli


def test_publish_to_s3_and_fetch_over_http_without_credentials(
        built: Cli, aws_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(aws_env)
    got = built.json("publish", "toy", "--to", s3_url(aws_env, bucket))
    assert got["public_url"] == public_url(aws_env, bucket)
    # The chroot archive, its lock, spec and SBOM, the 4 locked packages and the repo's key:
    # every blob of the local store.
    local_blobs = {p.name for p in (built.store_path / "blobs/sha256").iterdir()}
    assert got["copied"] == len(local_blobs) == 9
    digest = got["digest"]
    keys = {o["Key"] for o in client("s3", aws_env).list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"envs/index.json"} | {f"envs/blobs/sha256/{b}" for b in local_blobs}

    # A second process with no credentials reads the bucket's public URL as a plain HTTP store.
    consumer = tmp_path / "consumer"
    env = no_aws_env(consumer)
    out = provision("fetch", "toy", "--store", got["public_url"], "--cache", str(consumer / "cache"),
                    "--json", env=env)
    fetched = json.loads(out.stdout)
    assert fetched["digest"] == digest and not fetched["cached"]
    local = built.json("fetch", "toy")
    assert snapshot(Path(fetched["root"])) == snapshot(Path(local["root"]))
    run = provision("run", "toy", "--store", got["public_url"], "--cache", str(consumer / "cache"),
                    "--", "cat", "/etc/toy-release", env=env)
    assert run.stdout == "toy 1\n"
    # ...and the S3 URL itself without credentials is a one-line error, not a traceback.
    bad = provision("list", "--store", s3_url(aws_env, bucket), env=env, rc=1)
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr

    # Publishing again uploads nothing and keeps one version.
    again = built.json("publish", "toy", "--to", s3_url(aws_env, bucket))
    assert again["copied"] == 0 and again["digest"] == digest
    index = S3Store(s3_url(aws_env, bucket)).read_index()
    assert [v.digest for v in index.environments["toy"].versions] == [digest]
    assert index.environments["toy"].tags == {"latest": digest}


def _update_many(args: tuple[str, int, int]) -> None:
    url, worker, count = args
    store = S3Store(url)
    for i in range(count):
        n = worker * 1000 + i

        def add(idx: Index, n: int = n) -> Index:
            return idx.with_version(f"env{n % 3}", version(n), tags=(f"t{n}",))

        store.update_index(add)


def test_concurrent_index_writers_lose_no_update(aws_env: str) -> None:
    """Conditional writes (If-None-Match on create, If-Match on replace) with retry: 4 processes
    x 6 updates, starting from no index at all, all land."""
    url = s3_url(aws_env, new_bucket(aws_env))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_update_many, [(url, w, 6) for w in range(4)])
    index = S3Store(url).read_index()
    digests = {v.digest for e in index.environments.values() for v in e.versions}
    assert digests == {version(w * 1000 + i).digest for w in range(4) for i in range(6)}


def test_two_concurrent_publishes_both_land(
        yum_repo: tuple[YumRepo, str], tmp_path: Path, capfd: pytest.CaptureFixture[str],
        config_home: Path, aws_env: str) -> None:
    _repo, url = yum_repo
    cli = Cli(tmp_path / "local", tmp_path / "cache", capfd)
    cli("build", str(write_spec(tmp_path / "a", url)))
    cli("build", str(write_spec(tmp_path / "b", url, **{"name: toy": "name: toy-two",
                                                         "toy 1": "toy 2"})))
    dest = s3_url(aws_env, new_bucket(aws_env))
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-m", "provision.cli", "publish", name,
                               "--store", str(tmp_path / "local"), "--to", dest],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("toy", "toy-two")]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    index = S3Store(dest).read_index()
    assert set(index.environments) == {"toy", "toy-two"}
    local = cli.json("list")["environments"]
    for name in ("toy", "toy-two"):
        assert index.environments[name].tags["latest"] == local[name]["tags"]["latest"]


def test_multipart_blob_is_verified_and_uploaded_once(aws_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(aws_env)
    store = S3Store(s3_url(aws_env, bucket))
    src = tmp_path / "big"
    with src.open("wb") as f:  # three parts, the last one short
        for i in range(2 * PART_SIZE // (1 << 20) + 3):
            f.write(bytes([i % 251]) * (1 << 20))
    digest = file_digest(src)
    wrong = "sha256:" + "1" * 64
    with pytest.raises(DigestMismatch):
        store.put_blob(wrong, src)
    assert not store.has_blob(wrong)
    s3 = client("s3", aws_env)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    store.put_blob(digest, src)
    assert store.has_blob(digest)
    head = s3.head_object(Bucket=bucket, Key=f"envs/blobs/sha256/{digest[7:]}")
    assert head["ETag"].endswith('-3"')  # multipart, 3 parts
    assert head["Metadata"]["sha256"] == digest[7:]
    store.put_blob(digest, src)  # exists: not uploaded again
    assert s3.head_object(Bucket=bucket, Key=f"envs/blobs/sha256/{digest[7:]}")["LastModified"] \
        == head["LastModified"]

    back = tmp_path / "back" / "blob"
    store.get_blob(digest, back)
    assert file_digest(back) == digest
    # A blob whose bytes were changed in the bucket is refused, and nothing is left behind.
    s3.put_object(Bucket=bucket, Key=f"envs/blobs/sha256/{digest[7:]}", Body=b"tampered")
    bad = tmp_path / "bad" / "blob"
    with pytest.raises(DigestMismatch):
        store.get_blob(digest, bad)
    assert list(bad.parent.iterdir()) == []


def test_unreachable_endpoint_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          config_home: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    cli = Cli("s3://nowhere/envs?endpoint=http://127.0.0.1:9&region=us-east-1",
              tmp_path / "cache", capfd)
    _out, err = cli("list", rc=1)
    assert err.startswith("provision: error: s3://nowhere/envs/") and err.count("\n") == 1
    with pytest.raises(StoreError, match="not an S3 store URL"):
        S3Store("s3:///x")


# ---------------------------------------------------------------------- signed indexes

def test_keygen_sign_and_verify(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                config_home: Path) -> None:
    cli = Cli(tmp_path / "store", tmp_path / "cache", capfd)
    out, _ = cli("keygen")
    public = out.strip()
    key = config_home / "provision" / "signing.key"
    assert public.startswith("ed25519:") and key.is_file()
    assert key.stat().st_mode & 0o777 == 0o600
    assert (config_home / "provision" / "signing.key.pub").read_text().strip() == public
    cli("keygen", rc=1)  # never overwrites a key without --force

    store = tmp_path / "store"
    store.mkdir()
    from provision.store import LocalStore, open_store

    signed = open_store(str(store))  # the default key signs
    signed.update_index(lambda i: i.with_version("env", version(1)))
    data = json.loads((store / "index.json").read_text())
    assert data["signature"]["key"] == public
    assert open_store(str(store), public_key=public).read_index().signed_by == public

    other = generate_key(tmp_path / "other.key").public_key
    with pytest.raises(SignatureError, match="not by the pinned key"):
        open_store(str(store), public_key=other).read_index()
    # Re-indenting does not break the signature; changing anything does.
    (store / "index.json").write_text(json.dumps(data, indent=4))
    assert open_store(str(store), public_key=public).read_index().environments
    data["environments"]["env"]["versions"][0]["size"] = 2
    (store / "index.json").write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="does not match its content"):
        open_store(str(store), public_key=public).read_index()
    # Unsigned, with a key pinned: refused. Without a pinned key: read.
    unsigned = LocalStore(tmp_path / "unsigned")
    unsigned.update_index(lambda i: i.with_version("env", version(1)))
    with pytest.raises(SignatureError, match="not signed"):
        open_store(str(tmp_path / "unsigned"), public_key=public).read_index()
    assert open_store(str(tmp_path / "unsigned")).read_index().environments


def test_signed_s3_index_tampered_is_refused(built: Cli, aws_env: str, tmp_path: Path,
                                             config_home: Path) -> None:
    public, _ = built("keygen")
    public = public.strip()
    bucket = new_bucket(aws_env)
    got = built.json("publish", "toy", "--to", s3_url(aws_env, bucket))
    consumer = tmp_path / "consumer"
    env = no_aws_env(consumer)
    cache = str(consumer / "cache")
    # The consumer pins the key (given explicitly here; `pin` would record the index's key).
    src = consumer / "src"
    src.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "provision.cli", "pin", "toy", "--store",
                          got["public_url"], "--public-key", public, "--json"],
                         env=env, cwd=src, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["public_key"] == public
    pin = json.loads((src / "provision.pin").read_text())
    assert pin["public_key"] == public
    ok = subprocess.run([sys.executable, "-m", "provision.cli", "fetch", "--cache", cache],
                        env=env, cwd=src, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr

    s3 = client("s3", aws_env)
    body = s3.get_object(Bucket=bucket, Key="envs/index.json")["Body"].read()
    data: dict[str, Any] = json.loads(body)
    assert data["signature"]["key"] == public
    # Point "latest" at another digest, keeping the signature: refused by the pinned consumer.
    data["environments"]["toy"]["versions"][0]["size"] += 1
    s3.put_object(Bucket=bucket, Key="envs/index.json", Body=json.dumps(data).encode())
    bad = subprocess.run([sys.executable, "-m", "provision.cli", "fetch", "--cache",
                          str(consumer / "cache2")], env=env, cwd=src, capture_output=True,
                         text=True)
    assert bad.returncode == 1
    assert "index signature does not match its content" in bad.stderr
    assert bad.stderr.count("\n") == 1
    assert not (consumer / "cache2" / "roots").exists() or \
        not any((consumer / "cache2" / "roots").iterdir())
    # ...also read directly from S3 by a publisher that pins the key.
    with pytest.raises(SignatureError):
        store = S3Store(s3_url(aws_env, bucket))
        store.trusted_key = public
        store.read_index()
    # Unsigned (the signature stripped): refused by the pinned consumer too.
    del data["signature"]
    s3.put_object(Bucket=bucket, Key="envs/index.json", Body=json.dumps(data).encode())
    bad = provision("list", "--store", got["public_url"], "--public-key", public, env=env, rc=1)
    assert "not signed" in bad.stderr
