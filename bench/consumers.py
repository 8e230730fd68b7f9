#!/usr/bin/env python3
"""How fast consumers get a build environment, as ratios against baselines of the same run.

    .venv/bin/python bench/consumers.py [--spec envs/bookworm-build.yaml] [--runs 3]

Needs root (mounts a tmpfs, bootstraps a root, enters one) and the environment built in the
store (`scripts/demo` does that; otherwise this builds it first). Every case runs into a tmpfs
and into a directory on disk (disk writes on shared machines are noisy: compare the tmpfs
column first); each time is the median of --runs.

    bare unpack     zstd -dc ARCHIVE | tar -x                (the floor for a cold fetch)
    cold fetch      provision's fetch from the local store: stream, hash, check every
                    member, extract, sync, rename
    ready           fetch of a cached digest (the root is there: nothing to do), and that
                    plus `run -- true` (overlay, namespaces, chroot, exec)
    bootstrap       the same root bootstrapped from its (cached) packages
    archive build   provision's deterministic archive of the root, vs tar | zstd -T0 -10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from provision import run
from provision.archive import Compression, write_archive
from provision.build import build
from provision.cache import PackageCache, default_cache_dir
from provision.enter import enter
from provision.fetch import fetch
from provision.index import Ref
from provision.lock import read_lock
from provision.rootfs import bootstrap
from provision.spec import load_spec
from provision.store import open_store

REPO = Path(__file__).resolve().parents[1]
BARE = "bare unpack (zstd -dc | tar -x)"
COLD = "cold fetch (stream, verify, unpack)"
READY = "ready: cached fetch (root ready to use)"
RUN = "ready: cached fetch + run true (overlay, chroot)"
ARCH_BARE = "archive build: tar | zstd -T0 -10"
ARCH = "archive build: provision (deterministic)"
BOOT = "bootstrap from cached packages"


@contextlib.contextmanager
def tmpfs(size: str = "6G") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bench-tmpfs-"))
    run.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture=True)
    try:
        yield d
    finally:
        run.run(["umount", str(d)], capture=True, check=False)
        d.rmdir()


@contextlib.contextmanager
def on_disk() -> Iterator[Path]:
    base = default_cache_dir() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="disk-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def median_time(runs: int, case: Callable[[int], object],
                cleanup: Callable[[int], object] | None = None) -> float:
    """The median wall time of case(0), case(1), ... (each gets its own run number);
    cleanup(i) runs after each, untimed."""
    times = []
    for i in range(runs):
        t = time.perf_counter()
        case(i)
        times.append(time.perf_counter() - t)
        if cleanup is not None:
            cleanup(i)
    return statistics.median(times)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def bare_unpack(archive: Path, dest: Path) -> None:
    dest.mkdir()
    dec = run.popen(["zstd", "-dc", "-q", str(archive)], stdout=subprocess.PIPE)
    tar = run.popen(["tar", "-x", "-C", str(dest)], stdin=dec.stdout)
    assert dec.stdout is not None
    dec.stdout.close()
    run.check_returncode(tar)
    run.check_returncode(dec)


def bare_archive(root: Path, dest: Path) -> None:
    with dest.open("wb") as out:
        tar = run.popen(["tar", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE)
        zst = run.popen(["zstd", "-q", "-T0", "-10"], stdin=tar.stdout, stdout=out)
        assert tar.stdout is not None
        tar.stdout.close()
        run.check_returncode(zst)
        run.check_returncode(tar)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(REPO / "envs/bookworm-build.yaml"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (tmpfs mounts, bootstrap, run)", file=sys.stderr)
        return 2
    spec = load_spec(Path(args.spec))
    store = open_store(args.store)
    index = store.read_index()
    if spec.name not in index.environments:
        print(f"bench: building {spec.name} first", file=sys.stderr)
        build(spec, store)
        index = store.read_index()
    _env, version = index.resolve(Ref(spec.name))
    archive = store.local_path(version.digest)
    if archive is None:
        print("bench: needs a local store", file=sys.stderr)
        return 2
    lock = read_lock(spec.lock_path)
    pkgs = PackageCache(default_cache_dir() / "packages")
    pkgs.ensure(lock)
    rows: dict[str, dict[str, float]] = {}
    n = args.runs
    ref = Ref(spec.name)

    def measure(where: str, d: Path) -> None:
        def cell(name: str, secs: float) -> None:
            rows.setdefault(name, {})[where] = secs

        def cold(i: int) -> None:
            fetch(ref, store, cache_dir=d / f"cache{i}")

        warm = d / "cache0"

        def ready(i: int) -> None:
            fetch(ref, store, cache_dir=warm)

        def run_true(i: int) -> None:
            enter(fetch(ref, store, cache_dir=warm).root, ["true"], scratch_dir=warm / "run")

        cell(BARE, median_time(n, lambda i: bare_unpack(archive, d / f"bare{i}"),
                               lambda i: remove(d / f"bare{i}")))
        def uncache(i: int) -> None:
            if i:  # cache0 stays: the warm cases read it
                remove(d / f"cache{i}")

        cell(COLD, median_time(n, cold, uncache))
        cell(READY, median_time(n, ready))
        cell(RUN, median_time(n, run_true))
        root = fetch(ref, store, cache_dir=warm).root
        cell(ARCH_BARE, median_time(n, lambda i: bare_archive(root, d / f"bare{i}.tar.zst"),
                                    lambda i: remove(d / f"bare{i}.tar.zst")))
        cell(ARCH, median_time(n, lambda i: write_archive(
            root, d / f"mine{i}.tar.zst", source_date_epoch=lock.source_date_epoch,
            compression=Compression(spec.compression), exclude=spec.exclude),
            lambda i: remove(d / f"mine{i}.tar.zst")))

        def boot(i: int) -> None:
            (d / f"boot{i}-work").mkdir()
            bootstrap(spec, lock, pkgs, d / f"boot{i}", d / f"boot{i}-work")

        cell(BOOT, median_time(1, boot))

    with tmpfs() as d:
        measure("tmpfs", d)
    with on_disk() as d:
        measure("disk", d)

    t = rows
    print(f"{spec.name}@{version.digest[:19]}: archive {version.size / 1e6:.0f} MB, tar "
          f"{version.tar_size / 1e6:.0f} MB, {version.package_count} packages; {os.cpu_count()} "
          f"CPUs; median of {n} runs (bootstrap: 1)")
    print(f"{'case':50} {'tmpfs s':>8} {'disk s':>8}")
    for name, row in rows.items():
        print(f"{name:50} {row.get('tmpfs', 0):8.3f} {row.get('disk', 0):8.3f}")
    bare, cold, ready, run_true, boot = t[BARE], t[COLD], t[READY], t[RUN], t[BOOT]
    arch_bare, arch = t[ARCH_BARE], t[ARCH]
    print(f"\n{'goal':52} {'tmpfs':>10} {'disk':>10}")
    goals: list[tuple[str, Callable[[str], float], float, str]] = [
        ("cold fetch / bare unpack        <= 1.15x", lambda w: cold[w] / bare[w], 1.15, "le"),
        ("ready to build (+ run true)     <  1 s", lambda w: run_true[w], 1.0, "lt"),
        ("cold fetch / ready to build     >= 100x", lambda w: cold[w] / ready[w], 100, "ge"),
        ("bootstrap / cold fetch          >= 20x", lambda w: boot[w] / cold[w], 20, "ge"),
        ("archive build / tar|zstd -T0    <= 1.2x", lambda w: arch[w] / arch_bare[w], 1.2, "le"),
    ]
    for label, ratio, goal, how in goals:
        cells = []
        for w in ("tmpfs", "disk"):
            v = ratio(w)
            ok = v <= goal if how == "le" else v < goal if how == "lt" else v >= goal
            cells.append(f"{v:7.2f} {'ok' if ok else 'NO'}")
        print(f"{label:52} {cells[0]:>10} {cells[1]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
