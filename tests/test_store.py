"""Store and index: atomic, content-addressed, safe against concurrent publishers, and
readable over plain HTTP."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import pytest
from yumrepo import HttpServer

from provision.errors import DigestMismatch, StoreError
from provision.index import Index, Ref, Version, parse_ref
from provision.store import LocalStore, open_store


def version(n: int, digest: str | None = None) -> Version:
    return Version(digest=digest or "sha256:" + hashlib.sha256(str(n).encode()).hexdigest(),
                   created="2026-01-01T00:00:00Z", lock_digest="sha256:" + "0" * 64, size=n,
                   tar_sha256="sha256:" + "1" * 64, tar_size=n, compression="zstd",
                   source_date_epoch=0, packages=("a 1 all",))


def test_refs() -> None:
    assert parse_ref("env") == Ref("env")
    assert parse_ref("env:stable") == Ref("env", "stable")
    d = "sha256:" + "a" * 64
    assert parse_ref(f"env@{d}") == Ref("env", None, d)
    for bad in ("", "Env", "env@sha256:zz", "a/b", "../x"):
        with pytest.raises(StoreError):
            parse_ref(bad)


def test_index_resolves_tags_and_digests() -> None:
    idx = Index().with_version("e", version(1)).with_version("e", version(2))
    assert idx.resolve(Ref("e"))[1] == version(2)
    assert idx.resolve(Ref("e", None, version(1).digest))[1] == version(1)
    again = idx.with_version("e", version(1))
    assert len(again.environments["e"].versions) == 2  # one record per digest
    assert Index.from_json(idx.to_json()) == idx
    with pytest.raises(StoreError, match="no environment named 'nope'"):
        idx.resolve(Ref("nope"))
    with pytest.raises(StoreError, match="no tag 'old'"):
        idx.resolve(Ref("e", "old"))
    with pytest.raises(StoreError, match="not a valid index"):
        Index.from_json(b'{"schema": 1, "environments": {"e": {}}}')


def test_blob_put_is_verified_and_atomic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "blob"
    src.write_bytes(b"hello")
    digest = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(DigestMismatch):
        store.put_blob("sha256:" + "0" * 64, src)
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    store.put_blob(digest, src)
    store.put_blob(digest, src)  # a blob that exists is not written again
    assert store.has_blob(digest)
    out = tmp_path / "out"
    store.get_blob(digest, out)
    assert out.read_bytes() == b"hello"


def _publish(args: tuple[str, int]) -> None:
    root, n = args
    store = LocalStore(Path(root))
    for i in range(n * 10, n * 10 + 10):

        def add(idx: Index, i: int = i) -> Index:
            return idx.with_version(f"env{i % 3}", version(i))

        store.update_index(add)


def test_concurrent_publishers_lose_no_update(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_publish, [(str(root), n) for n in range(4)])
    idx = LocalStore(root).read_index()
    assert sum(len(e.versions) for e in idx.environments.values()) == 40
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_a_store_served_over_http_is_a_read_only_store(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "store")
    src = tmp_path / "blob"
    src.write_bytes(b"payload")
    digest = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    local.put_blob(digest, src)
    local.update_index(lambda idx: idx.with_version("e", version(7, digest)))
    with HttpServer(tmp_path / "store") as srv:
        remote = open_store(srv.url)
        assert remote.read_index() == local.read_index()
        assert remote.has_blob(digest)
        remote.get_blob(digest, tmp_path / "copy")
        assert (tmp_path / "copy").read_bytes() == b"payload"
        with pytest.raises(StoreError, match="read-only"):
            remote.update_index(lambda idx: idx)
        with pytest.raises(StoreError, match="no blob"):
            remote.get_blob("sha256:" + "0" * 64, tmp_path / "none")
        assert not (tmp_path / "none").exists()
    with HttpServer(tmp_path) as srv, pytest.raises(StoreError, match="not a store"):
        open_store(srv.url).read_index()
