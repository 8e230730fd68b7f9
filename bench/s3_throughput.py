#!/usr/bin/env python3
"""Upload and download throughput of the S3 store, against moto's server on 127.0.0.1.

    .venv/bin/python bench/s3_throughput.py [--size-mb 500] [--threads 4]

Publishes one blob of SIZE MB (random bytes: an archive does not compress further) to a fresh
bucket and reads it back three ways: with credentials through boto3 (S3Store.get_blob), and as
a consumer without credentials over the bucket's public URL (HttpStore.get_blob), each verified
against its digest. A local file copy of the same bytes is the baseline of the same run. moto
keeps objects in memory in one Python process, so these numbers bound our client's overhead,
not what S3 itself would give.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from motoserver import FAKE_CREDENTIALS, moto_server, new_bucket

from provision.fsutil import file_digest
from provision.store import HttpStore


def timed(fn: Callable[..., object], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--threads", type=int, default=4, help="parallel part uploads")
    args = ap.parse_args()
    os.environ.update(FAKE_CREDENTIALS)
    os.environ["PROVISION_S3_THREADS"] = str(args.threads)
    from provision.s3 import S3Store  # reads PROVISION_S3_THREADS

    with tempfile.TemporaryDirectory(prefix="bench-s3-", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        blob = work / "archive"
        with blob.open("wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        digest = file_digest(blob)
        size = blob.stat().st_size
        with moto_server(work / "moto.log") as endpoint:
            bucket = new_bucket(endpoint)
            store = S3Store(f"s3://{bucket}/envs?endpoint={endpoint}")
            rows = [
                ("local copy (baseline)", timed(shutil.copyfile, blob, work / "copy")),
                (f"upload: S3Store.put_blob, multipart x{args.threads}",
                 timed(store.put_blob, digest, blob)),
                ("download: S3Store.get_blob (boto3, verified)",
                 timed(store.get_blob, digest, work / "got-s3")),
                ("download: public URL, no credentials (verified)",
                 timed(HttpStore(store.public_url).get_blob, digest, work / "got-http")),
            ]
    base = rows[0][1]
    print(f"{size / 1e6:.0f} MB blob, {os.cpu_count()} CPUs, moto server on 127.0.0.1")
    print(f"{'case':52} {'seconds':>8} {'MB/s':>8} {'x baseline':>11}")
    for name, secs in rows:
        print(f"{name:52} {secs:8.2f} {size / 1e6 / secs:8.1f} {secs / base:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
