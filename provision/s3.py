"""The S3 store: the same interface as the local directory, on a bucket (AWS or S3-compatible).

    s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]

Credentials and region come from boto3's usual chain (environment, ~/.aws, instance role);
`endpoint=` (or boto3's own $AWS_ENDPOINT_URL_S3) points at an S3-compatible store.

- Blobs are immutable and content-addressed: one that exists is not uploaded again. Uploads are
  multipart, parts in parallel, each part carrying its SHA-256 checksum for S3 to check; a
  failed upload is aborted, so no half-written blob is ever visible.
- The index is written last, with S3 conditional writes: `If-None-Match: *` when creating it,
  `If-Match: <ETag>` when replacing it. A writer that lost the race (HTTP 412) reads the new
  index, applies its change again and retries, so two publishers at once lose no update.
- Consumers need no credentials: they read the same layout from the bucket's public URL
  (`public_url`), as an `HttpStore`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from provision.download import save_stream
from provision.errors import DigestMismatch, StoreError
from provision.fsutil import file_digest
from provision.index import Index
from provision.progress import Progress
from provision.store import INDEX, Store, blob_key

PART_SIZE = 16 << 20  # S3's minimum is 5 MiB (but for the last part)
THREADS = int(os.environ.get("PROVISION_S3_THREADS", "4"))
INDEX_RETRIES = 30
CLIENT_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "some/prefix/"
    endpoint: str | None
    region: str | None

    @property
    def url(self) -> str:
        url = f"s3://{self.bucket}/{self.prefix}"
        query = {k: v for k, v in (("endpoint", self.endpoint), ("region", self.region)) if v}
        return url + ("?" + urllib.parse.urlencode(query) if query else "")


def parse_s3_url(url: str) -> S3Location:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"{url!r} is not an S3 store URL (s3://BUCKET[/PREFIX])")
    query = urllib.parse.parse_qs(parts.query)
    unknown = sorted(set(query) - {"endpoint", "region"})
    if unknown:
        raise StoreError(f"{url}: unknown option {unknown[0]!r} (known: endpoint, region)")
    prefix = parts.path.strip("/")
    return S3Location(
        bucket=parts.netloc,
        prefix=prefix + "/" if prefix else "",
        endpoint=query.get("endpoint", [None])[0] or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"),
        region=query.get("region", [None])[0],
    )


def _code(e: Exception) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _status(e: Exception) -> int:
    if isinstance(e, botocore.exceptions.ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return 0


def _b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class S3Store(Store):
    def __init__(self, url: str, *, client: Any = None) -> None:
        self.loc = parse_s3_url(url)
        self.url = self.loc.url
        self.bucket = self.loc.bucket
        self.prefix = self.loc.prefix
        self.client = client or boto3.session.Session().client(
            "s3", endpoint_url=self.loc.endpoint, region_name=self.loc.region,
            config=botocore.config.Config(
                max_pool_connections=max(10, THREADS * 2),
                retries={"mode": "standard", "max_attempts": 5},
                s3={"addressing_style": "path"} if self.loc.endpoint else None))

    # ------------------------------------------------------------------ helpers
    def key(self, rel: str) -> str:
        return self.prefix + rel

    @property
    def public_url(self) -> str:
        """Where consumers read the store without credentials (the bucket must allow it)."""
        if self.loc.endpoint:
            return f"{self.loc.endpoint.rstrip('/')}/{self.bucket}/{self.prefix}"
        region = self.client.meta.region_name or "us-east-1"
        return f"https://{self.bucket}.s3.{region}.amazonaws.com/{self.prefix}"

    def _fail(self, what: str, e: Exception) -> StoreError:
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return StoreError(f"{self.url}: no AWS credentials to {what} (a consumer reads "
                              f"{self.public_url} instead)")
        if isinstance(e, botocore.exceptions.EndpointConnectionError):
            return StoreError(f"{self.url}: cannot reach S3 endpoint to {what}: {e}")
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            return StoreError(f"{self.url}: cannot {what}: {err.get('Code')}: "
                              f"{err.get('Message') or _status(e)}")
        return StoreError(f"{self.url}: cannot {what}: {e}")

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
            return head
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404 or _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(f"read {key}", e) from None
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"read {key}", e) from None

    # ------------------------------------------------------------------ blobs
    def has_blob(self, digest: str) -> bool:
        return self._head(self.key(blob_key(digest))) is not None

    def put_blob(self, digest: str, src: Path) -> None:
        key = self.key(blob_key(digest))
        if self._head(key) is not None:
            return
        if file_digest(src) != digest:
            raise DigestMismatch(f"{src} does not have digest {digest}")
        self.upload(key, src, label=f"uploading {digest[:19]}",
                    metadata={"sha256": digest.split(":", 1)[1]},
                    cache_control="public, max-age=31536000, immutable")

    def upload(self, key: str, src: Path, *, label: str | None = None,
               metadata: dict[str, str] | None = None, cache_control: str | None = None,
               if_none_match: bool = True) -> None:
        """Upload a file to `key`: one request when small, else multipart with parts in
        parallel. Every part carries its SHA-256 for S3 to check. Nothing is visible at `key`
        unless the whole upload completed."""
        size = src.stat().st_size
        extra: dict[str, Any] = {"ContentType": "application/octet-stream",
                                 "Metadata": metadata or {}}
        if cache_control:
            extra["CacheControl"] = cache_control
        bar = Progress(label, size) if label else None
        try:
            if size <= PART_SIZE:
                data = src.read_bytes()
                self._put(key, data, extra, if_none_match)
                if bar:
                    bar.add(size)
            else:
                self._multipart(key, src, size, extra, if_none_match, bar)
        except OSError as e:
            raise StoreError(f"cannot read {src}: {e.strerror}") from None
        finally:
            if bar:
                bar.close()

    def _put(self, key: str, data: bytes, extra: dict[str, Any], if_none_match: bool) -> None:
        cond = {"IfNoneMatch": "*"} if if_none_match else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                   ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64sha256(data),
                                   **cond, **extra)
        except CLIENT_ERRORS as e:
            if if_none_match and _status(e) == 412:
                return  # another publisher wrote the same content-addressed blob first
            raise self._fail(f"upload {key}", e) from None

    def _multipart(self, key: str, src: Path, size: int, extra: dict[str, Any],
                   if_none_match: bool, bar: Progress | None) -> None:
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", **extra)["UploadId"]
        except CLIENT_ERRORS as e:
            raise self._fail(f"upload {key}", e) from None
        count = (size + PART_SIZE - 1) // PART_SIZE
        fd = os.open(src, os.O_RDONLY)

        def part(n: int) -> dict[str, Any]:
            data = os.pread(fd, PART_SIZE, (n - 1) * PART_SIZE)
            checksum = _b64sha256(data)
            r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                        PartNumber=n, Body=data, ChecksumAlgorithm="SHA256",
                                        ChecksumSHA256=checksum)
            if bar:
                bar.add(len(data))
            return {"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": checksum}

        try:
            with ThreadPoolExecutor(max_workers=THREADS) as pool:
                parts = list(pool.map(part, range(1, count + 1)))
            cond = {"IfNoneMatch": "*"} if if_none_match else {}
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, **cond)
        except BaseException as e:
            self._abort(key, upload_id)
            if isinstance(e, CLIENT_ERRORS):
                if if_none_match and _status(e) == 412:
                    return
                raise self._fail(f"upload {key}", e) from None
            raise
        finally:
            os.close(fd)

    def _abort(self, key: str, upload_id: str) -> None:
        # On failure, the bucket's lifecycle rule for incomplete uploads cleans up the rest.
        with contextlib.suppress(*CLIENT_ERRORS):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except CLIENT_ERRORS as e:
            raise self._fail(f"delete {key}", e) from None

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[tuple[Iterator[bytes], int | None]]:
        key = self.key(blob_key(digest))
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        except CLIENT_ERRORS as e:
            if _status(e) == 404:
                raise StoreError(f"store {self.url} has no blob {digest}") from None
            raise self._fail(f"read {key}", e) from None

        def chunks() -> Iterator[bytes]:
            try:
                yield from r["Body"].iter_chunks(1 << 20)
            except CLIENT_ERRORS as e:
                raise self._fail(f"read {key}", e) from None

        try:
            yield chunks(), int(r["ContentLength"])
        finally:
            r["Body"].close()

    def get_blob(self, digest: str, dest: Path, *, label: str | None = None) -> None:
        with self.open_blob(digest) as (chunks, length):
            save_stream(chunks, dest, what=f"{self.url} {digest}",
                        sha256=digest.split(":", 1)[1], length=length, label=label)

    # ------------------------------------------------------------------ index
    def _read_index(self) -> tuple[Index, str | None]:
        key = self.key(INDEX)
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
            data = r["Body"].read()
        except CLIENT_ERRORS as e:
            if _status(e) == 404 or _code(e) == "NoSuchKey":
                return Index(), None
            raise self._fail(f"read {key}", e) from None
        return Index.from_json(data, f"{self.url}{INDEX}", self.trusted_key), str(r["ETag"])

    def read_index(self) -> Index:
        return self._read_index()[0]

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        key = self.key(INDEX)
        for attempt in range(INDEX_RETRIES):
            current, etag = self._read_index()
            new = change(current)
            body = new.to_json(self.signer()).encode()
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, ContentType="application/json",
                    CacheControl="no-cache", ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64sha256(body), **cond)
                return new
            except CLIENT_ERRORS as e:
                # 412: someone wrote the index since we read it; 409: a write in flight.
                if _status(e) not in (409, 412):
                    raise self._fail(f"write {key}", e) from None
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5))  # noqa: S311
        raise StoreError(f"{self.url}: index changed under us {INDEX_RETRIES} times; giving up")
