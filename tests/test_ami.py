"""AMI publishing (provision/ami.py).

What runs where:
- against moto's real server (a separate process, see tests/motoserver.py): the S3 store, the raw
  disk's upload and deletion, describe_images, register_image, create_tags, copy_image,
  modify_image_attribute and describe_image_attribute;
- stubbed with botocore's Stubber: VM Import (import_snapshot, describe_import_snapshot_tasks),
  which moto does not implement, and every EC2 call in the tests named `..._stubbed`, which
  check the request fields moto drops (block device mappings, ENA, architecture, boot mode,
  tags) and AMI Block Public Access, which moto does not implement either.
The qcow2 is a real one (qemu-img), converted to raw for real.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import ANY, Stubber
from motoserver import client, new_bucket

import provision.cli
from provision import run
from provision.ami import AmiError, ami_for, publish_amis
from provision.fsutil import file_digest
from provision.index import Index, Ref, Version
from provision.s3 import S3Store
from provision.store import LocalStore

NAME = "toy"
HOME, OTHER = "us-east-1", "eu-west-1"
DISK_SIZE = 64 << 20
MARKER = b"provision ami test disk\n"
SNAP_TASK = "import-snap-1234567890abcdef0"


# --------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No signing key or trusted key from the machine's config."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("PROVISION_SIGNING_KEY", "PROVISION_PUBLIC_KEY", "PROVISION_STORE"):
        monkeypatch.delenv(var, raising=False)


def make_qcow2(tmp_path: Path) -> Path:
    """A small real qcow2 whose disk starts with MARKER."""
    raw = tmp_path / "seed.raw"
    with raw.open("wb") as f:
        f.write(MARKER)
        f.truncate(DISK_SIZE)
    qcow2 = tmp_path / "disk.qcow2"
    run.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "64M"], capture=True)
    run.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], capture=True)
    raw.unlink()
    return qcow2


def make_version(store: Any, tmp_path: Path, *, amis: dict[str, str] | None = None
                 ) -> tuple[Version, Path]:
    """A version in the store's index whose qcow2 artifact is a real qcow2 blob. Its digest is
    unique, so images other tests leave in moto's regions never match it."""
    qcow2 = make_qcow2(tmp_path)
    archive = tmp_path / "env.tar.zst"
    archive.write_bytes(f"not really an archive {uuid.uuid4()}\n".encode())
    digest, qcow2_digest = file_digest(archive), file_digest(qcow2)
    store.put_blob(digest, archive)
    store.put_blob(qcow2_digest, qcow2)
    version = Version(
        digest=digest, created="2025-01-02T03:04:05Z", lock_digest="sha256:" + "1" * 64,
        size=archive.stat().st_size, tar_sha256="sha256:" + "2" * 64, tar_size=10240,
        compression="zstd", source_date_epoch=1735787045,
        packages=("bash 5.2.15-2+b7 amd64", "coreutils 9.1-1 amd64"),
        artifacts={"qcow2": qcow2_digest}, amis=amis or {})
    store.update_index(lambda i: i.with_version(NAME, version))
    return version, qcow2


def image_tags(version: Version) -> list[dict[str, str]]:
    return [{"Key": "Name", "Value": f"{NAME}-{version.digest[7:23]}"},
            {"Key": "provision:name", "Value": NAME},
            {"Key": "provision:digest", "Value": version.digest},
            {"Key": "provision:lock-digest", "Value": version.lock_digest}]


@functools.cache
def ec2_at(endpoint: str, region: str) -> Any:
    """moto's EC2 in a region (clients are slow to make: one per region is enough)."""
    return client("ec2", endpoint, region)


def images_tagged(endpoint: str, region: str, version: Version) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = ec2_at(endpoint, region).describe_images(
        Owners=["self"], Filters=[{"Name": "tag:provision:digest", "Values": [version.digest]}]
    )["Images"]
    return images


def cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """`provision ...` in-process."""
    return provision.cli.main(list(argv))


def task(version: Version, store: S3Store, status: str, **detail: Any) -> dict[str, Any]:
    """An import snapshot task as AWS describes it (VM Import/Export guide's example)."""
    return {"Description": f"{NAME} {version.digest} (provision)", "ImportTaskId": SNAP_TASK,
            "SnapshotTaskDetail": {
                "Description": f"{NAME} {version.digest} (provision)", "Format": "RAW",
                "Status": status, "DiskImageSize": float(DISK_SIZE),
                "UserBucket": {"S3Bucket": store.bucket,
                               "S3Key": store.key(f"imports/{version.digest[7:]}.raw")},
                **detail}}


# --------------------------------------------------------------------------- against moto

def test_ami_flow_against_moto_server_with_stubbed_import(
        aws_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="provision.ami")
    endpoint = aws_env
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", endpoint)  # ami.ec2_client, the default, goes to moto
    bucket = new_bucket(endpoint)
    url = f"s3://{bucket}/envs?endpoint={endpoint}"
    store = S3Store(url)
    version, qcow2 = make_version(store, tmp_path)
    key = store.key(f"imports/{version.digest[7:]}.raw")
    s3 = client("s3", endpoint)

    # A real snapshot in moto for the stubbed import to "produce".
    home = ec2_at(endpoint, HOME)
    volume = home.create_volume(AvailabilityZone=f"{HOME}a", Size=1)["VolumeId"]
    snapshot = home.create_snapshot(VolumeId=volume)["SnapshotId"]

    importer = client("ec2", endpoint, HOME)
    seen: dict[str, Any] = {}

    def peek(params: dict[str, Any], **_: Any) -> None:
        """When VM Import is asked to read the raw disk, it is in the bucket, whole."""
        where = params["DiskContainer"]["UserBucket"]
        seen["size"] = s3.head_object(Bucket=where["S3Bucket"], Key=where["S3Key"])["ContentLength"]
        seen["start"] = s3.get_object(Bucket=where["S3Bucket"], Key=where["S3Key"],
                                      Range=f"bytes=0-{len(MARKER) - 1}")["Body"].read()

    importer.meta.events.register("before-parameter-build.ec2.ImportSnapshot", peek)
    stub = Stubber(importer)
    stub.add_response("import_snapshot", task(version, store, "active", Progress="0"),
                      {"Description": ANY, "TagSpecifications": ANY,
                       "DiskContainer": {"Description": ANY, "Format": "RAW",
                                         "UserBucket": {"S3Bucket": bucket, "S3Key": key}}})
    stub.add_response("describe_import_snapshot_tasks",
                      {"ImportSnapshotTasks": [task(version, store, "active", Progress="42",
                                                    StatusMessage="downloading/converting")]},
                      {"ImportTaskIds": [SNAP_TASK]})
    stub.add_response("describe_import_snapshot_tasks",
                      {"ImportSnapshotTasks": [task(version, store, "completed", SnapshotId=snapshot)]},
                      {"ImportTaskIds": [SNAP_TASK]})

    def importer_for(region: str) -> Any:
        assert region == HOME
        return importer

    with stub:
        amis = publish_amis(store, NAME, version, qcow2, [HOME, OTHER], importer=importer_for,
                            poll_seconds=0.01)
        stub.assert_no_pending_responses()

    # moto has no AMI Block Public Access (HTTP 500): the probe shrugs, once per region.
    assert sum("no AMI Block Public Access state" in r.getMessage() for r in caplog.records) == 2
    # The raw disk was in the bucket for VM Import, and is gone now.
    assert seen == {"size": DISK_SIZE, "start": MARKER}
    assert s3.list_objects_v2(Bucket=bucket, Prefix=store.key("imports/"))["KeyCount"] == 0
    assert sorted(amis) == [OTHER, HOME] and amis[HOME] != amis[OTHER]
    # Recorded in the index.
    assert store.read_index().resolve(Ref(NAME))[1].amis == amis
    # In moto: one image per region, tagged, public; the home one made from the snapshot.
    for region in (HOME, OTHER):
        [image] = images_tagged(endpoint, region, version)
        assert image["ImageId"] == amis[region]
        assert image["Name"] == f"{NAME}-{version.digest[7:23]}"
        assert {"Key": "provision:digest", "Value": version.digest} in image["Tags"]
        assert image["Public"] is True
        perms = ec2_at(endpoint, region).describe_image_attribute(
            ImageId=amis[region], Attribute="launchPermission")["LaunchPermissions"]
        assert {"Group": "all"} in perms
    capsys.readouterr()

    # `provision ami` reads it back from the S3 store.
    assert cli(monkeypatch, "ami", NAME, "--region", OTHER, "--store", url) == 0
    assert capsys.readouterr().out.strip() == amis[OTHER]
    assert cli(monkeypatch, "ami", f"{NAME}@{version.digest}", "--region", HOME, "--store", url,
               "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "name": NAME, "digest": version.digest, "region": HOME, "ami": amis[HOME]}

    # Publishing again reuses both images: no import (the stubber has nothing queued, so any
    # call to it would fail), no copy, no new image.
    with stub:
        again = publish_amis(store, NAME, version, qcow2, [HOME, OTHER], importer=importer_for,
                             poll_seconds=0.01)
    assert again == amis
    for region in (HOME, OTHER):
        assert [i["ImageId"] for i in images_tagged(endpoint, region, version)] == [amis[region]]
    assert "reusing" in capsys.readouterr().err


# --------------------------------------------------------------------------- stubbed EC2

def test_register_image_request_shape_stubbed(aws_env: str, tmp_path: Path) -> None:
    """Every EC2 call stubbed, each request checked field by field (moto drops most of these)."""
    store = S3Store(f"s3://{new_bucket(aws_env)}/envs?endpoint={aws_env}")
    version, qcow2 = make_version(store, tmp_path)
    key = store.key(f"imports/{version.digest[7:]}.raw")
    description = f"{NAME} {version.digest} (provision)"
    tags = image_tags(version)
    by_tag = [{"Name": "tag:provision:digest", "Values": [version.digest]}]
    image_id, snapshot = "ami-0123456789abcdef0", "snap-0123456789abcdef0"

    ec2 = client("ec2", aws_env, HOME)
    stub = Stubber(ec2)
    stub.add_response("describe_images", {"Images": []}, {"Owners": ["self"], "Filters": by_tag})
    stub.add_response("describe_snapshots", {"Snapshots": []},
                      {"OwnerIds": ["self"],
                       "Filters": [*by_tag, {"Name": "status", "Values": ["completed"]}]})
    stub.add_response("import_snapshot", task(version, store, "active"), {
        "Description": description,
        "DiskContainer": {"Description": description, "Format": "RAW",
                          "UserBucket": {"S3Bucket": store.bucket, "S3Key": key}},
        "TagSpecifications": [{"ResourceType": "import-snapshot-task", "Tags": tags}]})
    stub.add_response("describe_import_snapshot_tasks",
                      {"ImportSnapshotTasks": [task(version, store, "completed", SnapshotId=snapshot)]},
                      {"ImportTaskIds": [SNAP_TASK]})
    stub.add_response("create_tags", {}, {"Resources": [snapshot], "Tags": tags})
    stub.add_response("register_image", {"ImageId": image_id}, {
        "Name": f"{NAME}-{version.digest[7:23]}",
        "Description": description,
        "Architecture": "x86_64",
        "RootDeviceName": "/dev/xvda",
        "BlockDeviceMappings": [{"DeviceName": "/dev/xvda",
                                 "Ebs": {"SnapshotId": snapshot, "VolumeType": "gp3",
                                         "DeleteOnTermination": True}}],
        "VirtualizationType": "hvm",
        "EnaSupport": True,
        "BootMode": "legacy-bios",
        "TagSpecifications": [{"ResourceType": "image", "Tags": tags}]})
    stub.add_response("create_tags", {}, {"Resources": [image_id], "Tags": tags})
    stub.add_response("describe_images",
                      {"Images": [{"ImageId": image_id, "State": "pending", "Public": False}]},
                      {"ImageIds": [image_id]})
    stub.add_response("describe_images",
                      {"Images": [{"ImageId": image_id, "State": "available", "Public": False}]},
                      {"ImageIds": [image_id]})
    stub.add_response("get_image_block_public_access_state",
                      {"ImageBlockPublicAccessState": "unblocked"}, {})
    stub.add_response("modify_image_attribute", {},
                      {"ImageId": image_id, "LaunchPermission": {"Add": [{"Group": "all"}]}})

    with stub:
        amis = publish_amis(store, NAME, version, qcow2, [HOME], ec2=lambda region: ec2,
                            poll_seconds=0.01)
        stub.assert_no_pending_responses()
    assert amis == {HOME: image_id}
    assert store.read_index().resolve(Ref(NAME))[1].amis == amis
    s3 = client("s3", aws_env)
    assert s3.list_objects_v2(Bucket=store.bucket, Prefix=store.key("imports/"))["KeyCount"] == 0


def _existing_image(stub: Stubber, version: Version, image_id: str) -> None:
    """describe_images finds our image (so nothing is imported), and it is available."""
    image = {"ImageId": image_id, "State": "available", "Public": False,
             "Tags": image_tags(version)}
    stub.add_response("describe_images", {"Images": [image]},
                      {"Owners": ["self"], "Filters": ANY})
    stub.add_response("describe_images", {"Images": [image]}, {"ImageIds": [image_id]})


def test_block_public_access_gives_clear_error_stubbed(aws_env: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{new_bucket(aws_env)}/envs?endpoint={aws_env}")
    version, qcow2 = make_version(store, tmp_path)
    image_id = "ami-0123456789abcdef0"
    ec2 = client("ec2", aws_env, HOME)
    stub = Stubber(ec2)
    fix = f"aws ec2 disable-image-block-public-access --region {HOME}"

    # The probe says sharing is blocked: stop before trying.
    _existing_image(stub, version, image_id)
    stub.add_response("get_image_block_public_access_state",
                      {"ImageBlockPublicAccessState": "block-new-sharing", "ManagedBy": "account"}, {})
    with stub, pytest.raises(AmiError) as e:
        publish_amis(store, NAME, version, qcow2, [HOME], ec2=lambda region: ec2, poll_seconds=0.01)
    message = str(e.value)
    assert "\n" not in message
    assert HOME in message and "Block Public Access" in message and fix in message

    # The probe is not allowed/answered, and AWS refuses the sharing itself (its message as
    # seen in the wild): the same clear line.
    _existing_image(stub, version, image_id)
    stub.add_client_error("get_image_block_public_access_state", "InternalError",
                          "An internal error has occurred", http_status_code=500)
    stub.add_client_error(
        "modify_image_attribute", "OperationNotPermitted",
        "You can\u2019t publicly share this image because block public access for AMIs is enabled "
        "for this account. To publicly share the image, you must call the "
        "DisableImageBlockPublicAccess API.", http_status_code=400,
        expected_params={"ImageId": image_id, "LaunchPermission": {"Add": [{"Group": "all"}]}})
    with stub, pytest.raises(AmiError) as e:
        publish_amis(store, NAME, version, qcow2, [HOME], ec2=lambda region: ec2, poll_seconds=0.01)
    assert str(e.value) == message
    stub.assert_no_pending_responses()

    # Nothing recorded.
    assert store.read_index().resolve(Ref(NAME))[1].amis == {}


def test_aws_errors_are_one_line_stubbed(aws_env: str, tmp_path: Path) -> None:
    """AccessDenied and the like: one AmiError line naming region and step, no traceback."""
    store = S3Store(f"s3://{new_bucket(aws_env)}/envs?endpoint={aws_env}")
    version, qcow2 = make_version(store, tmp_path)
    ec2 = client("ec2", aws_env, HOME)
    stub = Stubber(ec2)
    stub.add_client_error("describe_images", "UnauthorizedOperation",
                          "You are not authorized to perform this operation.", http_status_code=403)
    with stub, pytest.raises(AmiError) as e:
        publish_amis(store, NAME, version, qcow2, [HOME], ec2=lambda region: ec2, poll_seconds=0.01)
    assert str(e.value) == (f"{HOME}: cannot look for an existing image: UnauthorizedOperation: "
                            "You are not authorized to perform this operation.")
    assert e.value.__suppress_context__


def test_no_credentials_is_one_line_against_moto_server(
        aws_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default EC2 client, pointed at moto by $AWS_ENDPOINT_URL_EC2, without credentials."""
    store = S3Store(f"s3://{new_bucket(aws_env)}/envs?endpoint={aws_env}")
    version, qcow2 = make_version(store, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", aws_env)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(AmiError, match=r"^us-east-1: no AWS credentials to look for an existing image"):
        publish_amis(store, NAME, version, qcow2, [HOME], poll_seconds=0.01)


# --------------------------------------------------------------------------- reading them back

def test_ami_missing_region_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`provision ami` reads any store's index (a local one here)."""
    store = LocalStore(tmp_path / "store")
    version, _ = make_version(store, tmp_path, amis={HOME: "ami-0123456789abcdef0"})
    assert cli(monkeypatch, "ami", NAME, "--region", HOME, "--store", str(store.root)) == 0
    assert capsys.readouterr().out == "ami-0123456789abcdef0\n"

    assert cli(monkeypatch, "ami", NAME, "--region", OTHER, "--store", str(store.root)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("provision: error: ") and OTHER in err and f"AMIs in: {HOME}" in err

    # A version without any AMI says how to publish some.
    bare = Index().with_version(NAME, Version(**{**version.__dict__, "amis": {}}))
    with pytest.raises(AmiError, match=r"no AMIs were published .*--ami-regions eu-west-1"):
        ami_for(bare, Ref(NAME), OTHER)
