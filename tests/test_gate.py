"""The publish gate, on synthetic trees with planted secrets, and on archives of those trees."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from provision.archive import Compression, write_archive
from provision.errors import ArchiveError, ProvisionError
from provision.gate import CHUNK, Finding, GateError, enforce, scan_archive, scan_tree
from provision.run import run
from provision.spec import Allow

PEM = serialization.Encoding.PEM
NO_PASS = serialization.NoEncryption()


@dataclass(frozen=True)
class Keys:
    rsa_pem: bytes  # -----BEGIN RSA PRIVATE KEY-----
    rsa_encrypted_pem: bytes  # the same, with Proc-Type/DEK-Info headers
    openssh: bytes  # -----BEGIN OPENSSH PRIVATE KEY-----
    openssh_pub: bytes
    ec_pkcs8: bytes  # -----BEGIN PRIVATE KEY-----
    encrypted_pkcs8: bytes  # -----BEGIN ENCRYPTED PRIVATE KEY-----
    public_pem: bytes
    certificate: bytes


@pytest.fixture(scope="module")
def keys() -> Keys:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed = ed25519.Ed25519PrivateKey.generate()
    eck = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gate.test")])
    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(eck.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(eck, hashes.SHA256()))
    trad = serialization.PrivateFormat.TraditionalOpenSSL
    pkcs8 = serialization.PrivateFormat.PKCS8
    return Keys(
        rsa_pem=rsa_key.private_bytes(PEM, trad, NO_PASS),
        rsa_encrypted_pem=rsa_key.private_bytes(
            PEM, trad, serialization.BestAvailableEncryption(b"secret")),
        openssh=ed.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, NO_PASS),
        openssh_pub=ed.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH),
        ec_pkcs8=eck.private_bytes(PEM, pkcs8, NO_PASS),
        encrypted_pkcs8=eck.private_bytes(PEM, pkcs8, serialization.BestAvailableEncryption(b"pw")),
        public_pem=rsa_key.public_key().public_bytes(
            PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        certificate=cert.public_bytes(PEM),
    )


def b62(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


GITHUB_TOKEN = "ghp_" + b62(36)
AWS_KEY_ID = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
AWS_SECRET = "aB3" + base64.b64encode(secrets.token_bytes(30)).decode()[:37]

PROSE = b"""Key formats
===========

A PEM private key starts with a line like "-----BEGIN RSA PRIVATE KEY-----" and ends with
"-----END RSA PRIVATE KEY-----"; keep it out of images. For example:

    -----BEGIN RSA PRIVATE KEY-----
    MIIEowIBAAKCAQEA...
    -----END RSA PRIVATE KEY-----

Set your token as ghp_XXXX or in $GITHUB_TOKEN, never AKIAIOSFODNN7EXAMPLE in a file.
"""

DPKG_STATUS = """\
Package: openssh-server
Status: install ok installed
Architecture: amd64
Version: 1:9.2p1-2

Package: telnet
Status: deinstall ok config-files
Architecture: amd64
Version: 0.17+2.4-2

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2

Package: openssh-client
Status: install ok installed
Architecture: amd64
Version: 1:9.2p1-2
"""


def put(root: Path, path: str, data: bytes | str, mode: int = 0o600) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    p.chmod(mode)
    return p


def plant(root: Path, keys: Keys, outside: Path) -> None:
    """One secret of each common kind, the things that look like secrets but are not, and
    symlinks to a key outside the root."""
    put(root, "/root/.ssh/id_ed25519", keys.openssh)
    put(root, "/root/.ssh/id_ed25519.pub", keys.openssh_pub + b"\n", 0o644)
    put(root, "/home/alice/.ssh/id_rsa", keys.rsa_pem)
    put(root, "/etc/ssh/ssh_host_ed25519_key", keys.openssh)
    put(root, "/etc/ssh/ssh_host_ed25519_key.pub", keys.openssh_pub + b"\n", 0o644)
    put(root, "/root/.aws/credentials",
        f"[default]\naws_access_key_id = {AWS_KEY_ID}\naws_secret_access_key = {AWS_SECRET}\n")
    put(root, "/home/alice/.netrc", "machine example.org\n  login alice\n  password hunter2\n")
    put(root, "/home/alice/.npmrc", "//registry.npmjs.org/:_authToken=npm_abcdefghijklmnop\n")
    put(root, "/etc/myapp/config.yaml", f"server: https://example.org\ntoken: {GITHUB_TOKEN}\n",
        0o644)
    # Not secrets.
    put(root, "/etc/ssl/certs/gate-test.pem", keys.certificate, 0o644)
    put(root, "/usr/share/keys/rsa.pub.pem", keys.public_pem, 0o644)
    put(root, "/usr/share/doc/keys/README", PROSE, 0o644)
    put(root, "/etc/ssh/ssh_config", "Host *\n  IdentityFile ~/.ssh/id_rsa\n", 0o644)
    put(root, "/var/lib/dpkg/status", DPKG_STATUS, 0o644)
    # Symlinks to a key outside the root, to a file and to a directory: never followed.
    outside.mkdir(exist_ok=True)
    put(outside, "/id_rsa", keys.rsa_pem)
    (root / "root/outside-key").symlink_to(outside / "id_rsa")
    (root / "root/outside-dir").symlink_to(outside)
    (root / "root/relative-escape").symlink_to("../../../../../../" + str(outside).lstrip("/"))


PLANTED = {
    ("/root/.ssh/id_ed25519", "private-key"),
    ("/home/alice/.ssh/id_rsa", "private-key"),
    ("/etc/ssh/ssh_host_ed25519_key", "ssh-host-key"),
    ("/root/.aws/credentials", "aws-credentials"),
    ("/home/alice/.netrc", "netrc"),
    ("/home/alice/.npmrc", "npm-token"),
    ("/etc/myapp/config.yaml", "token"),
}


@pytest.fixture(scope="module")
def planted(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("planted")
    root = base / "root"
    root.mkdir()
    plant(root, keys, base / "outside")
    return root


def pairs(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.path, f.rule) for f in findings}


# --------------------------------------------------------------------------- trees

def test_each_planted_secret_is_found_with_its_rule_and_path(planted: Path) -> None:
    findings = scan_tree(planted)
    assert pairs(findings) == PLANTED
    assert findings == sorted(findings)
    assert len(findings) == len(PLANTED)  # the host key is reported once, as a host key
    by_path = {f.path: f for f in findings}
    assert by_path["/root/.ssh/id_ed25519"].detail == "OpenSSH private key at byte 0"
    assert "RSA private key" in by_path["/home/alice/.ssh/id_rsa"].detail
    assert "GitHub token (ghp_...)" in by_path["/etc/myapp/config.yaml"].detail


def test_details_never_carry_the_secret(planted: Path) -> None:
    text = "\n".join(f.detail for f in scan_tree(planted))
    for secret in (GITHUB_TOKEN, GITHUB_TOKEN[4:], AWS_SECRET, AWS_KEY_ID, "hunter2",
                   "npm_abcdefghijklmnop"):
        assert secret not in text


def test_public_keys_certificates_and_prose_are_not_findings(keys: Keys, tmp_path: Path) -> None:
    root = tmp_path / "root"
    put(root, "/etc/ssl/certs/a.pem", keys.certificate)
    put(root, "/etc/ssl/certs/bundle.crt", keys.certificate * 3)
    put(root, "/usr/share/keys/rsa.pub.pem", keys.public_pem)
    put(root, "/root/.ssh/authorized_keys", keys.openssh_pub + b" alice@example\n")
    put(root, "/usr/share/doc/keys/README", PROSE)
    # Source code that handles keys: the markers, but no key.
    put(root, "/usr/lib/python3/dist-packages/keys.py",
        'BEGIN = "-----BEGIN RSA PRIVATE KEY-----"\nEND = "-----END RSA PRIVATE KEY-----"\n'
        'def is_key(text):\n    return text.startswith(BEGIN)\n')
    # A block whose "body" is a placeholder.
    put(root, "/usr/share/doc/example.key",
        "-----BEGIN PRIVATE KEY-----\n<your key here>\n-----END PRIVATE KEY-----\n")
    # Credential files without credentials.
    put(root, "/home/alice/.netrc", "machine example.org login anonymous\n")
    put(root, "/home/alice/.npmrc", "//registry.npmjs.org/:_authToken=${NPM_TOKEN}\n")
    put(root, "/home/alice/.docker/config.json", '{"credsStore": "pass", "auths": {}}')
    put(root, "/home/alice/.aws/config", "[default]\nregion = eu-west-1\n")
    put(root, "/home/alice/.pypirc", "[distutils]\nindex-servers = pypi\n")
    # The documentation's example AWS key pair; an access key id alone; a short ghp_ name.
    put(root, "/usr/share/doc/aws.md", "AKIAIOSFODNN7EXAMPLE\nwJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    put(root, "/usr/share/doc/id.txt", f"key id {AWS_KEY_ID}, secret kept elsewhere\n")
    put(root, "/usr/lib/x.py", "def ghp_token_check(): pass\nxoxb-your-token\n")
    assert scan_tree(root) == []


ONE_RULE_EACH = {
    "rsa-encrypted-pem": ("/srv/a/key.pem", "rsa_encrypted_pem", "private-key"),
    "ec-pkcs8": ("/srv/a/key.pem", "ec_pkcs8", "private-key"),
    "encrypted-pkcs8": ("/srv/a/key.pem", "encrypted_pkcs8", "private-key"),
    "pgp": ("/srv/a/key.txt", b"-----BEGIN PGP PRIVATE KEY BLOCK-----\nComment: test\n\n"
            + base64.encodebytes(secrets.token_bytes(300))
            + b"=AbCd\n-----END PGP PRIVATE KEY BLOCK-----\n", "private-key"),
    "putty": ("/srv/a/key.ppk", b"PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: t\n"
              b"Public-Lines: 2\nAAAAC3NzaC1lZDI1NTE5AAAAIOoZ2e5vx0hG5ScQ1Y4pJ3t9\nAAAA\n"
              b"Private-Lines: 1\nAAAAIFRK1DpGWX5WgwJm8n3sH2cKz0pN1ZzcnRgq9L3y6r2m\nPrivate-MAC: 00\n",
              "private-key"),
    "rsa-crlf": ("/srv/a/key.pem", "rsa_crlf", "private-key"),
    "escaped-in-source": ("/srv/a/fixture.py", "escaped", "private-key"),
    "indented-in-yaml": ("/srv/a/values.yaml", "indented", "private-key"),
    "gcp": ("/srv/a/sa.json", "gcp", "gcp-credentials"),
    "git-credentials": ("/root/.git-credentials", "https://alice:s3cr3t@git.example.org\n",
                        "git-credentials"),
    "xdg-git-credentials": ("/home/bob/.config/git/credentials", "https://bob:pw@git.example.org\n",
                            "git-credentials"),
    "pypirc": ("/root/.pypirc", "[pypi]\nusername = __token__\npassword = pypi-AgEIcHlwaS5vcmc\n",
               "pypi-credentials"),
    "docker": ("/root/.docker/config.json",
               '{"auths": {"registry.example.org": {"auth": "YWxpY2U6cHc="}}}', "docker-auth"),
    "aws-env": ("/etc/env", f"AWS_ACCESS_KEY_ID={AWS_KEY_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n",
                "aws-credentials"),
    "gitlab": ("/etc/ci.yml", "token: glpat-" + b62(20) + "\n", "token"),
    "github-fine-grained": ("/etc/ci.yml", "token: github_pat_" + b62(22) + "_" + b62(59) + "\n",
                            "token"),
    "slack": ("/etc/slack.conf", "SLACK=xoxb-123456789012-1234567890123-" + b62(24) + "\n", "token"),
    # A token compiled into a binary is still a token.
    "token-in-elf": ("/usr/bin/tool", b"\x7fELF\x02\x01\x01" + bytes(100) + GITHUB_TOKEN.encode()
                     + bytes(10), "token"),
}


@pytest.mark.parametrize(("path", "content", "rule"), list(ONE_RULE_EACH.values()),
                         ids=list(ONE_RULE_EACH))
def test_one_rule_each(keys: Keys, tmp_path: Path, path: str, content: bytes | str, rule: str) -> None:
    if content == "gcp":
        pem = keys.ec_pkcs8.decode().replace("\n", "\\n")
        content = ('{"type": "service_account", "project_id": "p", "private_key_id": "1",\n'
                   f' "private_key": "{pem}",\n "client_email": "x@p.iam.gserviceaccount.com"}}\n')
    elif content == "rsa_crlf":
        content = keys.rsa_pem.replace(b"\n", b"\r\n")
    elif content == "escaped":
        content = 'KEY = "' + keys.rsa_pem.decode().replace("\n", "\\n") + '"\n'
    elif content == "indented":
        content = "tls:\n  key: |\n" + "".join(f"    {line}\n" for line in
                                             keys.ec_pkcs8.decode().splitlines())
    elif isinstance(content, str) and hasattr(keys, content):
        content = getattr(keys, content)
    root = tmp_path / "root"
    put(root, path, content)
    assert pairs(scan_tree(root)) == {(path, rule)}


def test_keys_compiled_into_objects_are_test_vectors(keys: Keys, tmp_path: Path) -> None:
    """GnuTLS's FIPS self-tests carry PKCS#8 keys inside libgnutls.so: not a leak."""
    root = tmp_path / "root"
    put(root, "/usr/lib/libx.so.1", b"\x7fELF\x02\x01\x01" + bytes(200) + keys.ec_pkcs8 + bytes(8))
    put(root, "/usr/lib/libx.a", b"!<arch>\n" + bytes(60) + keys.ec_pkcs8)
    assert scan_tree(root) == []


def test_a_key_across_a_read_boundary_is_found_in_tree_and_archive(keys: Keys, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i, at in enumerate((CHUNK - 100, CHUNK - 1, 3 * CHUNK - len(keys.rsa_pem) // 2)):
        put(root, f"/srv/blob{i}", b"x" * at + keys.rsa_pem + b"y" * 5000)
    # A token after a hole of a sparse file: only its data is read.
    with (root / "srv/sparse").open("wb") as f:
        f.seek(64 << 20)
        f.write(b"token=" + GITHUB_TOKEN.encode() + b"\n")
    # A large PGP block (3000 lines, 195 KB) that starts just before the end of a read.
    pgp = (b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n"
           + base64.encodebytes(secrets.token_bytes(3000 * 48))
           + b"=AbCd\n-----END PGP PRIVATE KEY BLOCK-----\n")
    put(root, "/srv/big-pgp", b"x" * (2 * CHUNK - 1000) + pgp)
    expect = {("/srv/blob0", "private-key"), ("/srv/blob1", "private-key"),
              ("/srv/blob2", "private-key"), ("/srv/big-pgp", "private-key"),
              ("/srv/sparse", "token")}
    found = scan_tree(root)
    assert pairs(found) == expect
    assert next(f for f in found if f.path == "/srv/blob1").detail.endswith(f"at byte {CHUNK - 1}")
    assert next(f for f in found if f.path == "/srv/sparse").detail.endswith(f"at byte {(64 << 20) + 6}")
    archive = tmp_path / "root.tar.zst"
    write_archive(root, archive, source_date_epoch=0)
    assert scan_archive(archive) == found


def test_hardlinks_are_reported_under_every_name(keys: Keys, tmp_path: Path) -> None:
    root = tmp_path / "root"
    key = put(root, "/home/alice/.ssh/id_rsa", keys.rsa_pem)
    (root / "srv").mkdir()
    os.link(key, root / "srv/copy")
    found = scan_tree(root)
    assert pairs(found) == {("/home/alice/.ssh/id_rsa", "private-key"), ("/srv/copy", "private-key")}
    archive = tmp_path / "root.tar.zst"
    write_archive(root, archive, source_date_epoch=0)
    assert scan_archive(archive) == found


def test_symlinks_to_keys_outside_the_root_are_not_followed(keys: Keys, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    put(tmp_path, "/outside/id_rsa", keys.rsa_pem)
    (root / "key").symlink_to(tmp_path / "outside/id_rsa")
    (root / "dir").symlink_to(tmp_path / "outside")
    (root / "netrc").symlink_to("../outside/id_rsa")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").symlink_to(tmp_path / "outside/id_rsa")
    assert scan_tree(root) == []


def test_exclude_mirrors_what_the_archive_leaves_out(keys: Keys, tmp_path: Path) -> None:
    root = tmp_path / "root"
    put(root, "/srv/cache/deep/id_rsa", keys.rsa_pem)
    put(root, "/srv/kept/id_rsa", keys.rsa_pem)
    assert pairs(scan_tree(root, exclude=["/srv/cache/*"])) == {("/srv/kept/id_rsa", "private-key")}
    assert pairs(scan_tree(root, exclude=["/srv/cache"])) == {("/srv/kept/id_rsa", "private-key")}
    archive = tmp_path / "root.tar.zst"
    write_archive(root, archive, source_date_epoch=0, exclude=["/srv/cache/*"])
    assert scan_archive(archive) == scan_tree(root, exclude=["/srv/cache/*"])


# --------------------------------------------------------------------------- the allow-list

def test_an_allow_entry_removes_exactly_its_path(planted: Path) -> None:
    allow = [Allow("/home/alice/.ssh/id_rsa", reason="the demo user's throwaway key")]
    assert pairs(scan_tree(planted, allow=allow)) == PLANTED - {("/home/alice/.ssh/id_rsa",
                                                                 "private-key")}


def test_an_allow_entry_with_a_rule_removes_only_that_rule(tmp_path: Path) -> None:
    root = tmp_path / "root"
    put(root, "/root/.git-credentials", f"https://alice:{GITHUB_TOKEN}@github.com\n")
    assert pairs(scan_tree(root)) == {("/root/.git-credentials", "git-credentials"),
                                      ("/root/.git-credentials", "token")}
    only_token = [Allow("/root/.git-credentials", reason="read-only CI token", rule="token")]
    assert pairs(scan_tree(root, allow=only_token)) == {("/root/.git-credentials", "git-credentials")}
    other_rule = [Allow("/root/.git-credentials", reason="wrong rule", rule="private-key")]
    assert len(scan_tree(root, allow=other_rule)) == 2
    every_rule = [Allow("/root/.git-credentials/", reason="a fixture")]
    assert scan_tree(root, allow=every_rule) == []


def test_allow_entries_that_match_nothing_are_reported_not_fatal(
        planted: Path, caplog: pytest.LogCaptureFixture) -> None:
    allow = [Allow("/nowhere", reason="stale"), Allow("/root/.ssh/id_ed25519", reason="x",
                                                      rule="no-such-rule")]
    with caplog.at_level(logging.WARNING, logger="provision.gate"):
        assert pairs(scan_tree(planted, allow=allow)) == PLANTED
    assert "allow entry /nowhere matched nothing" in caplog.text
    assert "names no gate rule 'no-such-rule'" in caplog.text


# --------------------------------------------------------------------------- forbidden packages

def test_forbidden_package_globs_match_installed_packages(planted: Path) -> None:
    found = scan_tree(planted, forbidden=["openssh-*", "telnet"])
    pkg = [f for f in found if f.rule == "forbidden-package"]
    assert [(f.path, f.detail) for f in pkg] == [
        ("/var/lib/dpkg/status", "installed package openssh-client matches forbidden 'openssh-*'"),
        ("/var/lib/dpkg/status", "installed package openssh-server matches forbidden 'openssh-*'"),
    ]  # telnet is only config files: not installed
    assert pairs(found) - {("/var/lib/dpkg/status", "forbidden-package")} == PLANTED
    assert [f for f in scan_tree(planted, forbidden=["zsh*"]) if f.rule == "forbidden-package"] == []


def test_forbidden_needs_a_package_database(tmp_path: Path) -> None:
    root = tmp_path / "root"
    put(root, "/etc/hostname", "x\n")
    with pytest.raises(ProvisionError, match="neither a dpkg nor an rpm database"):
        scan_tree(root, forbidden=["x"])
    archive = tmp_path / "root.tar.zst"
    write_archive(root, archive, source_date_epoch=0)
    with pytest.raises(ProvisionError, match="neither a dpkg nor an rpm database"):
        scan_archive(archive, forbidden=["x"])


def test_forbidden_packages_of_an_rpm_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dbpath = root / "var/lib/rpm"
    dbpath.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    spec = tmp_path / "telnet.spec"
    spec.write_text("Name: telnet\nVersion: 1.0\nRelease: 1\nSummary: t\nLicense: MIT\n"
                    "BuildArch: noarch\n%description\nt\n%files\n")
    run(["rpmbuild", "-bb", "--quiet", f"--define=_topdir {tmp_path / 'rpmbuild'}",
         f"--define=_dbpath {home / 'rpmdb'}", spec], capture=True, extra_env=env)
    rpm = tmp_path / "rpmbuild/RPMS/noarch/telnet-1.0-1.noarch.rpm"
    run(["rpm", f"--dbpath={dbpath}", "--initdb"], capture=True, extra_env=env)
    run(["rpm", f"--dbpath={dbpath}", "-i", "--justdb", "--nodeps", "--noscripts", "--nosignature",
         rpm], capture=True, extra_env=env)
    expect = [Finding("/var/lib/rpm", "forbidden-package",
                      "installed package telnet matches forbidden 'telnet*'")]
    assert scan_tree(root, forbidden=["telnet*"]) == expect
    archive = tmp_path / "root.tar.zst"
    write_archive(root, archive, source_date_epoch=0)
    assert scan_archive(archive, forbidden=["telnet*"]) == expect
    assert scan_archive(archive, packages=["telnet 1.0-1 noarch"], forbidden=["telnet*"]) == expect


# --------------------------------------------------------------------------- archives

@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.XZ])
def test_an_archive_gives_what_its_tree_gives(planted: Path, tmp_path: Path,
                                              compression: Compression) -> None:
    archive = tmp_path / f"root.tar.{compression}"
    write_archive(planted, archive, source_date_epoch=0, compression=compression)
    allow = [Allow("/home/alice/.netrc", reason="demo")]
    forbidden = ["openssh-server"]
    from_tree = scan_tree(planted, forbidden=forbidden, allow=allow)
    assert scan_archive(archive, forbidden=forbidden, allow=allow) == from_tree
    assert ("/root/.ssh/id_ed25519", "private-key") in pairs(from_tree)
    assert ("/var/lib/dpkg/status", "forbidden-package") in pairs(from_tree)
    # The index's package list ("name evr arch" lines) instead of the archive's database.
    lines = ["bash 5.2.15-2 amd64", "openssh-server 1:9.2p1-2 amd64"]
    assert scan_archive(archive, packages=lines, forbidden=forbidden, allow=allow) == from_tree
    assert scan_archive(archive, packages=["bash"], forbidden=forbidden, allow=allow) == [
        f for f in from_tree if f.rule != "forbidden-package"]


def test_a_corrupt_archive_is_an_archive_error(planted: Path, tmp_path: Path) -> None:
    archive = tmp_path / "root.tar.zst"
    write_archive(planted, archive, source_date_epoch=0)
    data = bytearray(archive.read_bytes())
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="corrupt or truncated zstd stream"):
        scan_archive(cut)
    (tmp_path / "plain.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(ArchiveError, match="not a zstd or xz archive"):
        scan_archive(tmp_path / "plain.tar")


# --------------------------------------------------------------------------- enforcing

def test_gate_error_names_each_path_and_rule(planted: Path) -> None:
    findings = scan_tree(planted, forbidden=["openssh-server"])
    with pytest.raises(GateError) as info:
        enforce(findings, "demo")
    err = info.value
    assert str(err) == (f"publish gate: {len(findings)} findings in demo "
                        "(allow one with the spec's allow: list, with a reason)")
    assert err.findings == findings
    assert len(err.problems) == len(findings)
    assert "/root/.ssh/id_ed25519: private-key: OpenSSH private key at byte 0" in err.problems
    assert ("/var/lib/dpkg/status: forbidden-package: installed package openssh-server matches "
            "forbidden 'openssh-server'") in err.problems
    assert all(line.split(": ")[1] in {r for _, r in PLANTED} | {"forbidden-package"}
               for line in err.problems)
    one = [Finding("/a", "token", "GitHub token (ghp_...) at byte 0")]
    with pytest.raises(GateError, match=r"^publish gate: 1 finding in x \("):
        enforce(one, "x")
    enforce([], "clean")
