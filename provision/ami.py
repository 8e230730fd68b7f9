"""AMIs: an environment version's VM image (qcow2, MBR disk, extlinux: legacy BIOS, x86_64)
published as public Amazon Machine Images, one per region.

    publish_amis(store, name, version, image, ["us-east-1", "eu-west-1"])

The first region is the home region. There the qcow2 is converted to a raw disk, uploaded to the
store's bucket (which must be in the home region: VM Import reads it from there), imported as an
EBS snapshot (VM Import, which needs the `vmimport` service role), and registered as an image;
every other region gets a copy of that image. Each image is tagged `provision:digest` = the
version's digest, so publishing again finds and reuses what exists instead of importing or
copying again. The ids end up in the store's index (`Version.amis`), where `provision ami REF
--region R` reads them.

Clients come from boto3's usual chain (credentials, region), and honour
$AWS_ENDPOINT_URL_EC2 / $AWS_ENDPOINT_URL for an EC2-compatible endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from provision import run
from provision.errors import ProvisionError
from provision.index import Index, Ref, Version, parse_ref
from provision.s3 import S3Store

log = logging.getLogger("provision.ami")

DIGEST_TAG = "provision:digest"
IMPORT_TIMEOUT = 6 * 3600.0  # VM Import of a large disk takes tens of minutes; give up after hours
IMAGE_TIMEOUT = 6 * 3600.0  # the same for an image becoming available (a copy to a far region)
NOT_FOUND_RETRIES = 10  # EC2 is eventually consistent: a new image id may be unknown for a moment
ACCESS_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure"}
# A 500 from an endpoint that does not implement an action (moto) comes as an unparsable body.
AWS_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
    botocore.parsers.ResponseParserError)


class AmiError(ProvisionError):
    """An AMI cannot be imported, registered, copied, made public or found."""


# --------------------------------------------------------------------------- clients and errors

def ec2_client(region: str, *, endpoint: str | None = None, max_attempts: int | None = None) -> Any:
    """A boto3 EC2 client for `region`. boto3 itself honours $AWS_ENDPOINT_URL_EC2 and
    $AWS_ENDPOINT_URL; `endpoint` overrides both. `max_attempts=1`: no retries."""
    retries: dict[str, Any] = {"mode": "standard", "max_attempts": max_attempts or 5}
    return boto3.session.Session().client(
        "ec2", region_name=region, endpoint_url=endpoint,
        config=botocore.config.Config(retries=retries))


def _code(e: Exception) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _message(e: Exception) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        return str(err.get("Message") or err.get("Code") or e)
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _blocked_message(region: str) -> str:
    return (f"{region}: cannot make the AMI public: AMI Block Public Access is on in {region} "
            f"(the default for new accounts); turn it off with `aws ec2 "
            f"disable-image-block-public-access --region {region}` and publish again")


def _is_block_public_access(e: Exception) -> bool:
    text = f"{_code(e)} {_message(e)}".lower().replace("-", " ")
    return "block public access" in text or "blockpublicaccess" in text.replace(" ", "")


@contextlib.contextmanager
def _aws(region: str, what: str) -> Iterator[None]:
    """Turn any boto error inside into one AmiError line naming the region and the step."""
    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise AmiError(f"{region}: no AWS credentials to {what} (set AWS_PROFILE or "
                       f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
    except botocore.exceptions.EndpointConnectionError as e:
        raise AmiError(f"{region}: cannot reach the EC2 endpoint to {what}: {e}") from None
    except botocore.exceptions.ClientError as e:
        hint = ""
        if "vmimport" in _message(e).lower():
            hint = " (VM Import needs the `vmimport` service role, see the VM Import/Export guide)"
        elif _code(e) == "InvalidAMIName.Duplicate":
            hint = f" (an image of that name exists without the {DIGEST_TAG} tag: tag or deregister it)"
        raise AmiError(f"{region}: cannot {what}: {_code(e)}: {_message(e)}{hint}") from None
    except AWS_ERRORS as e:
        raise AmiError(f"{region}: cannot {what}: {_message(e)}") from None


def _say(text: str) -> None:
    print(f"provision: ami: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the steps

def _tags(name: str, version: Version) -> list[dict[str, str]]:
    return [{"Key": "Name", "Value": f"{name}-{_hex(version)[:16]}"},
            {"Key": "provision:name", "Value": name},
            {"Key": DIGEST_TAG, "Value": version.digest},
            {"Key": "provision:lock-digest", "Value": version.lock_digest}]


def _hex(version: Version) -> str:
    return version.digest.split(":", 1)[1]


def _tag_filter(version: Version) -> dict[str, Any]:
    return {"Name": f"tag:{DIGEST_TAG}", "Values": [version.digest]}


def _find_image(client: Any, region: str, version: Version) -> dict[str, Any] | None:
    """Our image of this version in this region (available, or on its way), if there is one."""
    with _aws(region, "look for an existing image"):
        images = client.describe_images(Owners=["self"], Filters=[_tag_filter(version)])["Images"]
    usable = [i for i in images if i.get("State") in ("available", "pending")]
    usable.sort(key=lambda i: (i.get("CreationDate", ""), i["ImageId"]))
    return usable[0] if usable else None


def _find_snapshot(client: Any, region: str, version: Version) -> str | None:
    """A snapshot an earlier, interrupted publish imported, so it is not imported again."""
    with _aws(region, "look for an imported snapshot"):
        snaps = client.describe_snapshots(
            OwnerIds=["self"],
            Filters=[_tag_filter(version), {"Name": "status", "Values": ["completed"]}])["Snapshots"]
    snaps.sort(key=lambda s: s["SnapshotId"])
    return str(snaps[0]["SnapshotId"]) if snaps else None


def _check_bucket_region(store: S3Store, region: str) -> None:
    """VM Import reads the disk from a bucket in the region it imports into."""
    try:
        where = store.client.get_bucket_location(Bucket=store.bucket).get("LocationConstraint")
    except AWS_ERRORS as e:  # not allowed to ask: let VM Import say so if it matters
        log.debug("cannot read the location of bucket %s: %s", store.bucket, _message(e))
        return
    bucket_region = {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(where, where)
    if bucket_region != region:
        raise AmiError(f"the store's bucket {store.bucket} is in {bucket_region}, but VM Import runs "
                       f"in the first region, {region}: list {bucket_region} first")


def _import_snapshot(store: S3Store, name: str, version: Version, image: Path, region: str,
                     client: Any, poll_seconds: float) -> str:
    """qcow2 -> raw -> the store's bucket -> VM Import -> an EBS snapshot id. The raw object is
    deleted again whatever happens."""
    if not image.is_file():
        raise AmiError(f"no VM image at {image}")
    key = store.key(f"imports/{_hex(version)}.raw")
    description = f"{name} {version.digest} (provision)"
    with tempfile.TemporaryDirectory(prefix=".ami-", dir=image.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        _say(f"converting {image.name} to a raw disk")
        run.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw], capture=True)
        store.upload(key, raw, label="uploading raw disk", if_none_match=False)
    try:
        _say(f"importing snapshot in {region} (this takes a while) …")
        with _aws(region, "import the disk as a snapshot"):
            task = client.import_snapshot(
                Description=description,
                DiskContainer={"Description": description, "Format": "RAW",
                               "UserBucket": {"S3Bucket": store.bucket, "S3Key": key}},
                TagSpecifications=[{"ResourceType": "import-snapshot-task",
                                    "Tags": _tags(name, version)}])
        task_id = str(task["ImportTaskId"])
        deadline = time.monotonic() + IMPORT_TIMEOUT
        while True:
            with _aws(region, f"follow import task {task_id}"):
                tasks = client.describe_import_snapshot_tasks(ImportTaskIds=[task_id])
            found = tasks.get("ImportSnapshotTasks") or [{}]
            detail = found[0].get("SnapshotTaskDetail", {})
            status = str(detail.get("Status", ""))
            if status == "completed":
                if not detail.get("SnapshotId"):
                    raise AmiError(f"{region}: import task {task_id} completed without a snapshot")
                snapshot = str(detail["SnapshotId"])
                break
            if status in ("deleting", "deleted", "error", "failed") or not status:
                why = detail.get("StatusMessage") or status or "the task vanished"
                raise AmiError(f"{region}: import task {task_id} failed: {why}")
            if time.monotonic() > deadline:
                raise AmiError(f"{region}: import task {task_id} still {status} after "
                               f"{IMPORT_TIMEOUT / 3600:.0f} h; giving up")
            log.debug("%s: import task %s: %s %s%%", region, task_id, status, detail.get("Progress", "?"))
            time.sleep(poll_seconds)
    except BaseException:
        with contextlib.suppress(ProvisionError):  # the first error is the one to report
            store.delete(key)
        raise
    store.delete(key)
    return snapshot


def _register(client: Any, region: str, name: str, version: Version, snapshot: str) -> str:
    tags = _tags(name, version)
    with _aws(region, f"register an image from {snapshot}"):
        r = client.register_image(
            Name=f"{name}-{_hex(version)[:16]}",
            Description=f"{name} {version.digest} (provision)",
            Architecture="x86_64",
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda",
                                  "Ebs": {"SnapshotId": snapshot, "VolumeType": "gp3",
                                          "DeleteOnTermination": True}}],
            VirtualizationType="hvm",
            EnaSupport=True,
            BootMode="legacy-bios",
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}])
    return str(r["ImageId"])


def _create_tags(client: Any, region: str, resource: str, tags: list[dict[str, str]],
                 poll_seconds: float) -> None:
    """Tag a resource just made (whose id EC2 may not know everywhere yet)."""
    for attempt in range(NOT_FOUND_RETRIES):
        try:
            client.create_tags(Resources=[resource], Tags=tags)
            return
        except botocore.exceptions.ClientError as e:
            if not _code(e).endswith(".NotFound") or attempt == NOT_FOUND_RETRIES - 1:
                with _aws(region, f"tag {resource}"):
                    raise
        except AWS_ERRORS:
            with _aws(region, f"tag {resource}"):
                raise
        time.sleep(poll_seconds)


def _wait_available(client: Any, region: str, image_id: str, poll_seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + IMAGE_TIMEOUT
    misses = 0
    while True:
        try:
            images = client.describe_images(ImageIds=[image_id])["Images"]
        except botocore.exceptions.ClientError as e:
            if _code(e) != "InvalidAMIID.NotFound":
                with _aws(region, f"describe {image_id}"):
                    raise
            images = []
        except AWS_ERRORS:
            with _aws(region, f"describe {image_id}"):
                raise
        if not images:
            misses += 1
            if misses >= NOT_FOUND_RETRIES:
                raise AmiError(f"{region}: image {image_id} does not exist")
        state = str(images[0].get("State", "")) if images else "pending"
        if state == "available":
            image: dict[str, Any] = images[0]
            return image
        if state not in ("pending", ""):
            why = (images[0].get("StateReason") or {}).get("Message") or state
            raise AmiError(f"{region}: image {image_id} is {state}: {why}")
        if time.monotonic() > deadline:
            raise AmiError(f"{region}: image {image_id} still pending after "
                           f"{IMAGE_TIMEOUT / 3600:.0f} h; giving up")
        time.sleep(poll_seconds)


def _check_block_public_access(probe: Any, region: str) -> None:
    """Fail with the fix if AMI Block Public Access is on. An endpoint without the call (moto)
    or any other hiccup is not a reason to stop: modify_image_attribute has the last word."""
    try:
        state = probe.get_image_block_public_access_state().get("ImageBlockPublicAccessState")
    except botocore.exceptions.ClientError as e:
        if _code(e) in ACCESS_DENIED:
            with _aws(region, "read the AMI Block Public Access state"):
                raise
        log.debug("%s: no AMI Block Public Access state (%s); going on", region, _message(e))
        return
    except AWS_ERRORS as e:
        log.debug("%s: no AMI Block Public Access state (%s); going on", region, _message(e))
        return
    if state == "block-new-sharing":
        raise AmiError(_blocked_message(region))


def _make_public(client: Any, probe: Any, region: str, image: dict[str, Any]) -> None:
    if image.get("Public"):
        return
    image_id = image["ImageId"]
    _check_block_public_access(probe, region)
    _say(f"making {image_id} public in {region}")
    try:
        client.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"Group": "all"}]})
    except AWS_ERRORS as e:
        if _is_block_public_access(e):
            raise AmiError(_blocked_message(region)) from None
        with _aws(region, f"make {image_id} public"):
            raise


# --------------------------------------------------------------------------- the flow

def publish_amis(store: S3Store, name: str, version: Version, image: Path, regions: Sequence[str], *,
                 ec2: Callable[[str], Any] = ec2_client, importer: Callable[[str], Any] | None = None,
                 poll_seconds: float = 15.0, public: bool = True) -> dict[str, str]:
    """Publish `image` (the version's qcow2) as an AMI in every region (the first is the home
    region, the others get copies), public unless public=False; record the ids in the store's
    index and return them (region -> AMI id). Images already tagged with the version's digest
    are reused. `ec2` makes the EC2 client of a region, `importer` the one VM Import runs with
    (default: the same). The AMI Block Public Access probe runs with a client that does not
    retry when `ec2` is the default factory, else with `ec2`'s client."""
    if not isinstance(store, S3Store):
        raise AmiError(f"AMIs are imported from an S3 bucket: {store.url} is not an s3:// store")
    regions = list(dict.fromkeys(regions))
    if not regions:
        raise AmiError("no regions to publish AMIs in")
    home, others = regions[0], regions[1:]
    clients: dict[str, Any] = {}
    probes: dict[str, Any] = {}

    def client(region: str) -> Any:
        if region not in clients:
            with _aws(region, "make an EC2 client"):
                clients[region] = ec2(region)
        return clients[region]

    def probe(region: str) -> Any:
        if region not in probes:
            with _aws(region, "make an EC2 client"):
                probes[region] = (ec2_client(region, max_attempts=1) if ec2 is ec2_client
                                  else client(region))
        return probes[region]

    amis: dict[str, str] = {}
    # The home region: reuse, or import and register.
    found = _find_image(client(home), home, version)
    if found is not None:
        _say(f"reusing {found['ImageId']} in {home}")
        image_id = str(found["ImageId"])
    else:
        snapshot = _find_snapshot(client(home), home, version)
        if snapshot is not None:
            _say(f"reusing snapshot {snapshot} in {home}")
        else:
            _check_bucket_region(store, home)
            imp = importer(home) if importer is not None else client(home)
            snapshot = _import_snapshot(store, name, version, image, home, imp, poll_seconds)
            # The import task's tags stay on the task: tag the snapshot, so a rerun finds it.
            _create_tags(client(home), home, snapshot, _tags(name, version), poll_seconds)
        _say(f"registering image in {home}")
        image_id = _register(client(home), home, name, version, snapshot)
        # TagSpecifications make the tags on AWS; some endpoints drop them, so tag again.
        _create_tags(client(home), home, image_id, _tags(name, version), poll_seconds)
    home_image = _wait_available(client(home), home, image_id, poll_seconds)
    if public:
        _make_public(client(home), probe(home), home, home_image)
    amis[home] = image_id

    # The other regions: start every missing copy first, then wait for each.
    for region in others:
        found = _find_image(client(region), region, version)
        if found is not None:
            _say(f"reusing {found['ImageId']} in {region}")
            amis[region] = str(found["ImageId"])
            continue
        _say(f"copying {image_id} from {home} to {region}")
        with _aws(region, f"copy {image_id} from {home}"):
            r = client(region).copy_image(
                SourceRegion=home, SourceImageId=image_id,
                Name=f"{name}-{_hex(version)[:16]}",
                Description=f"{name} {version.digest} (provision)", CopyImageTags=True)
        amis[region] = str(r["ImageId"])
        _create_tags(client(region), region, amis[region], _tags(name, version), poll_seconds)
    for region in others:
        copied = _wait_available(client(region), region, amis[region], poll_seconds)
        if public:
            _make_public(client(region), probe(region), region, copied)

    store.update_index(lambda idx: idx.with_amis(name, version.digest, amis))
    return amis


# --------------------------------------------------------------------------- reading them back

def ami_for(index: Index, ref: Ref, region: str) -> str:
    """The AMI id of `ref`'s version in `region`."""
    _env, version = index.resolve(ref)
    if region in version.amis:
        return version.amis[region]
    where = f"{ref.name}@{version.digest[:19]}"
    if version.amis:
        raise AmiError(f"{where} has no AMI in {region} (it has AMIs in: "
                       f"{', '.join(sorted(version.amis))})")
    raise AmiError(f"no AMIs were published for {where} (publish them with "
                   f"`provision publish ... --ami-regions {region}`)")


def cmd_ami(args: argparse.Namespace) -> int:
    """provision ami REF [--region R]"""
    from provision.store import open_store

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise AmiError("no region given (use --region R, or set AWS_REGION)")
    ref = parse_ref(args.ref)
    index = open_store(args.store).read_index()
    ami = ami_for(index, ref, region)
    if args.json:
        _env, version = index.resolve(ref)
        print(json.dumps({"name": ref.name, "digest": version.digest, "region": region, "ami": ami},
                         indent=1, sort_keys=True))
    else:
        print(ami)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
               parents: Sequence[argparse.ArgumentParser] | None = None) -> None:
    """Add `ami` to the CLI's subcommands. Pass the CLI's common parent parser (--json, --store,
    --cache); without one --json and --store are added here."""
    s = sub.add_parser("ami", parents=list(parents or ()),
                       help="print the AMI id of an environment version in a region")
    if parents is None:
        s.add_argument("--json", action="store_true", help="print one JSON object")
        s.add_argument("--store", default=None, help="store path or URL")
    s.add_argument("ref", help="NAME, NAME:TAG or NAME@sha256:HEX")
    s.add_argument("--region", default=None,
                   help="AWS region (default: $AWS_REGION or $AWS_DEFAULT_REGION)")
    s.set_defaults(func=cmd_ami)
