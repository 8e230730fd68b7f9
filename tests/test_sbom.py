"""The SPDX SBOM of a built root: from the root's own package database, checked against the
lock, licenses from rpm headers or Debian copyright files, validated with spdx-tools."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from envtools import Cli
from spdxcheck import validate_spdx
from yumrepo import YumRepo

from provision.errors import ProvisionError
from provision.lock import Lock, LockedPackage, LockedRepo, read_lock
from provision.sbom import (
    Node,
    debian_copyright_license,
    in_root,
    license_refs,
    make_sbom,
    parse_debian_license,
    parse_rpm_license,
    render,
    sbom_summary,
    unmapped_names,
)
from provision.spec import Family

DIGEST = "sha256:" + "ab" * 32
DEP5 = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"


def check(tmp_path: Path, data: bytes) -> dict[str, Any]:
    """Write the document, validate it with spdx-tools, and return it parsed."""
    path = tmp_path / "sbom.spdx.json"
    path.write_bytes(data)
    assert validate_spdx(path) == []
    doc: dict[str, Any] = json.loads(data)
    return doc


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in doc["packages"] if p["SPDXID"] != "SPDXRef-Environment"}


# --------------------------------------------------------------------------- license names

def expr(node: Node | None) -> str:
    return render(node, license_refs(unmapped_names(node))) if node is not None else "NOASSERTION"


@pytest.mark.parametrize(("synopsis", "spdx"), [
    ("GPL-2+", "GPL-2.0-or-later"),
    ("GPL-2", "GPL-2.0-only"),
    ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("BSD-3-clause", "BSD-3-Clause"),
    ("Expat", "MIT"),
    ("Artistic or GPL-1+", "Artistic-1.0-Perl OR GPL-1.0-or-later"),
    # `and` binds tighter than `or`; a comma lowers the precedence of what follows it
    ("GPL-2+ or MIT and Zlib", "(MIT AND Zlib) OR GPL-2.0-or-later"),
    ("GPL-2+ or MIT, and Zlib", "(GPL-2.0-or-later OR MIT) AND Zlib"),
    ("GPL-2+ with Libtool exception", "GPL-2.0-or-later WITH Libtool-exception"),
    ("GPL-3+ with Bison exception", "LicenseRef-GPL-3-plus-with-Bison-exception"),  # which one?
    ("GPL", "LicenseRef-GPL"),  # no version: no guess
    ("ISC and/or LGPL-2.1+", "LicenseRef-ISC-and-or-LGPL-2.1-plus"),  # not the syntax: one name
    ("", "NOASSERTION"),
])
def test_debian_license_names(synopsis: str, spdx: str) -> None:
    assert expr(parse_debian_license(synopsis)) == spdx


@pytest.mark.parametrize(("tag", "spdx"), [
    ("MIT", "MIT"),
    ("GPL-2.0-only", "GPL-2.0-only"),
    ("GPLv2+ and (MIT or ASL 2.0)", "(Apache-2.0 OR MIT) AND GPL-2.0-or-later"),
    ("GPL-3.0-or-later WITH GCC-exception-3.1 AND LGPL-2.1-or-later",
     "GPL-3.0-or-later WITH GCC-exception-3.1 AND LGPL-2.1-or-later"),
    ("LGPLv2+", "LicenseRef-LGPLv2-plus"),  # Fedora's old name for both 2.0+ and 2.1+
    ("BSD", "LicenseRef-BSD"),  # Fedora's old name for many BSD variants
    ("GPLv2+ with exceptions", "LicenseRef-GPLv2-plus-with-exceptions"),
    ("(MIT", "LicenseRef-MIT"),
    ("(none)", "NOASSERTION"),
])
def test_rpm_license_tags(tag: str, spdx: str) -> None:
    assert expr(parse_rpm_license(tag)) == spdx


def test_paths_resolve_inside_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/share/doc/real").mkdir(parents=True)
    (root / "srv").mkdir()
    (root / "usr/share/doc/abs").symlink_to("/usr/share/doc/real")
    (root / "usr/share/doc/rel").symlink_to("real")
    (root / "usr/share/doc/up").symlink_to("../../../../../../..")
    (root / "srv/loop").symlink_to("/srv/loop")
    assert in_root(root, "/usr/share/doc/abs") == root / "usr/share/doc/real"
    assert in_root(root, "/usr/share/doc/rel/") == root / "usr/share/doc/real"
    assert in_root(root, "/usr/share/doc/up/etc") is None
    assert in_root(root, "/../etc") is None
    assert in_root(root, "/srv/loop") is None
    assert in_root(root, "/nothing") is None


# --------------------------------------------------------------------------- a Debian root

STATUS = """\
Package: alpha
Status: install ok installed
Priority: optional
Architecture: amd64
Maintainer: Alpha Team <alpha@example.org>
Version: 1.0-1
Description: alpha

Package: beta
Status: install ok installed
Priority: optional
Architecture: all
Maintainer: Beta Person <beta@example.org>
Source: beta-src (0.5-3)
Version: 2:0.5-3+b1
Description: beta

Package: gamma
Status: install ok installed
Priority: optional
Architecture: amd64
Maintainer: Gamma Team <gamma@example.org>
Version: 3.0
Description: gamma

Package: libstdc++6
Status: install ok installed
Priority: optional
Architecture: amd64
Maintainer: Alpha Team <alpha@example.org>
Source: alpha
Version: 1.0-1
Description: doc dir is a symlink to alpha's

Package: delta
Status: install ok installed
Priority: optional
Architecture: amd64
Maintainer: Delta Team <delta@example.org>
Version: 4
Description: doc dir is a symlink out of the root

Package: epsilon
Status: install ok installed
Priority: optional
Architecture: amd64
Maintainer: Epsilon Team <epsilon@example.org>
Version: 5
Description: doc dir is an absolute symlink (inside the root)

Package: zeta
Status: deinstall ok config-files
Priority: optional
Architecture: amd64
Maintainer: Zeta Team <zeta@example.org>
Version: 6
Description: removed; its files are gone
"""

ALPHA_COPYRIGHT = DEP5 + """\
Upstream-Name: alpha
Source: https://alpha.example.org/

Files: *
Copyright: 2020 Alpha Authors
License: GPL-2+
 This program is free software; ...

Files: lib/*
Copyright: 2019 Someone Else
License: BSD-3-clause

License: BSD-3-clause
 Redistribution and use in source and binary forms ...
"""

BETA_COPYRIGHT = DEP5 + """\

Files: *
Copyright: 2021 Beta Authors
License: Frobnicate-Public-License
 You may frobnicate.
"""

GAMMA_COPYRIGHT = """\
This package was debianized by Gamma <gamma@example.org>.

It is licensed under the terms of the GNU General Public License, version 2.
License: MIT
"""


def deb(name: str, version: str, arch: str, repo: str = "debian", source: str | None = None,
        sha: str = "1") -> LockedPackage:
    upstream = version.split(":", 1)[-1]
    return LockedPackage(name=name, version=version, arch=arch,
                         path=f"pool/main/{name[0]}/{name}/{name}_{upstream}_{arch}.deb", size=1000,
                         sha256=sha * 64, source=source or name, repo=repo)


LOCKED = (
    deb("alpha", "1.0-1", "amd64", sha="a"),
    deb("beta", "2:0.5-3+b1", "all", source="beta-src", sha="b"),
    deb("delta", "4", "amd64", sha="d"),
    deb("epsilon", "5", "amd64", sha="e"),
    deb("gamma", "3.0", "amd64", repo="local", sha="c"),
    deb("libstdc++6", "1.0-1", "amd64", source="alpha", sha="f"),
)


def deb_lock(packages: tuple[LockedPackage, ...] = LOCKED) -> Lock:
    return Lock(name="synth", family=Family.DEB, arch="amd64", spec_digest="sha256:" + "0" * 64,
                source_date_epoch=1700000000, packages=packages, suite="bookworm",
                repos=(LockedRepo("debian", "https://deb.example.org/debian/"),
                       LockedRepo("local", "${PROVISION_TEST_SBOM_MIRROR}")))


def deb_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(STATUS)
    doc = root / "usr/share/doc"
    for name, text in (("alpha", ALPHA_COPYRIGHT), ("beta", BETA_COPYRIGHT),
                       ("gamma", GAMMA_COPYRIGHT)):
        (doc / name).mkdir(parents=True)
        (doc / name / "copyright").write_text(text)
    (doc / "libstdc++6").symlink_to("alpha")
    # outside the root, a copyright file that must never be read
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/copyright").write_text(DEP5 + "\nFiles: *\nCopyright: x\nLicense: MIT\n")
    (doc / "delta").symlink_to("../../../../outside")
    (root / "srv/epsilon").mkdir(parents=True)
    (root / "srv/epsilon/copyright").write_text(DEP5 + "\nFiles: *\nCopyright: x\nLicense: Expat\n")
    (doc / "epsilon").symlink_to("/srv/epsilon")
    return root


def test_deb_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROVISION_TEST_SBOM_MIRROR", raising=False)
    root = deb_root(tmp_path)
    lock = deb_lock()
    data = make_sbom(root, lock, name="synth", digest=DIGEST)
    assert make_sbom(root, lock, name="synth", digest=DIGEST) == data
    doc = check(tmp_path, data)
    assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0"
    assert doc["creationInfo"] == {"created": "2023-11-14T22:13:20Z",
                                   "creators": ["Tool: provision-0.1.0"]}
    assert doc["documentNamespace"] == "https://spdx.org/spdxdocs/provision-synth-" + "ab" * 32
    pkgs = by_name(doc)
    assert sorted(pkgs) == sorted(p.name for p in LOCKED)  # zeta (config-files only) is absent

    # licenses: DEP-5 Files paragraphs; an unknown name is a declared LicenseRef; free-form
    # text (even one with a License: line) is NOASSERTION
    assert pkgs["alpha"]["licenseDeclared"] == "BSD-3-Clause AND GPL-2.0-or-later"
    assert pkgs["libstdc++6"]["licenseDeclared"] == "BSD-3-Clause AND GPL-2.0-or-later"
    assert pkgs["beta"]["licenseDeclared"] == "LicenseRef-Frobnicate-Public-License"
    assert pkgs["gamma"]["licenseDeclared"] == "NOASSERTION"
    assert pkgs["delta"]["licenseDeclared"] == "NOASSERTION"  # its doc dir leaves the root
    assert pkgs["epsilon"]["licenseDeclared"] == "MIT"  # /srv/epsilon inside the root
    [extracted] = doc["hasExtractedLicensingInfos"]
    assert extracted["licenseId"] == "LicenseRef-Frobnicate-Public-License"
    assert extracted["name"] == "Frobnicate-Public-License"
    assert '"Frobnicate-Public-License"' in extracted["extractedText"]

    beta = pkgs["beta"]
    assert beta["versionInfo"] == "2:0.5-3+b1"
    assert beta["checksums"] == [{"algorithm": "SHA256", "checksumValue": "b" * 64}]
    assert beta["downloadLocation"] == "https://deb.example.org/debian/" + LOCKED[1].path
    assert beta["externalRefs"] == [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                     "referenceLocator": "pkg:deb/debian/beta@2:0.5-3%2Bb1?arch=all"}]
    assert beta["supplier"] == "Organization: Beta Person (beta@example.org)"
    assert "beta-src 0.5-3" in beta["sourceInfo"]
    assert beta["licenseConcluded"] == beta["copyrightText"] == "NOASSERTION"
    assert beta["filesAnalyzed"] is False
    lib = pkgs["libstdc++6"]
    assert lib["SPDXID"] == "SPDXRef-Package-libstdcplusplus6-amd64"
    assert lib["externalRefs"][0]["referenceLocator"] == "pkg:deb/debian/libstdc%2B%2B6@1.0-1?arch=amd64"
    # ${PROVISION_TEST_SBOM_MIRROR} is not set: no download location rather than a wrong one
    assert pkgs["gamma"]["downloadLocation"] == "NOASSERTION"

    env = doc["packages"][0]
    assert env["SPDXID"] == "SPDXRef-Environment" and env["versionInfo"] == DIGEST
    assert lock.digest() in env["comment"]
    rels = doc["relationships"]
    assert rels[0] == {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                       "relatedSpdxElement": "SPDXRef-Environment"}
    assert sorted(r["relatedSpdxElement"] for r in rels[1:]) == sorted(p["SPDXID"] for p in pkgs.values())
    assert {r["relationshipType"] for r in rels[1:]} == {"CONTAINS"}

    summary = sbom_summary(data)
    assert summary["packages"] == 6 and summary["declared"] == 4 and summary["noassertion"] == 2
    assert summary["licenses"]["GPL-2.0-or-later"] == 2

    monkeypatch.setenv("PROVISION_TEST_SBOM_MIRROR", "https://mirror.example.org/local")
    doc = check(tmp_path, make_sbom(root, lock, name="synth", digest=DIGEST))
    assert by_name(doc)["gamma"]["downloadLocation"] == \
        "https://mirror.example.org/local/" + LOCKED[4].path


@pytest.mark.parametrize(("change", "message"), [
    (lambda ps: (*ps, deb("omega", "1", "amd64")), "locked but not installed: omega 1 amd64"),
    (lambda ps: tuple(p for p in ps if p.name != "gamma"), "not in the lock: gamma 3.0 amd64"),
    (lambda ps: tuple(deb("gamma", "3.1", "amd64") if p.name == "gamma" else p for p in ps),
     "another version: gamma amd64 (installed 3.0, locked 3.1)"),
])
def test_root_and_lock_must_agree(tmp_path: Path, change: Any, message: str) -> None:
    root = deb_root(tmp_path)
    with pytest.raises(ProvisionError) as e:
        make_sbom(root, deb_lock(change(LOCKED)), name="synth", digest=DIGEST)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "lock synth" in str(e.value)


def test_no_package_database_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(ProvisionError, match="no dpkg database"):
        make_sbom(tmp_path / "root", deb_lock(), name="synth", digest=DIGEST)


# --------------------------------------------------------------------------- an rpm root

RPM_SPEC = """\
name: toy
family: rpm
arch: x86_64
repos:
  - name: toy
    baseurl: ${PROVISION_TEST_SBOM_YUM}
    gpgkey: {key}
packages: [demo-tools]
"""


def test_rpm_environment(yum_repo: tuple[YumRepo, str], tmp_path: Path,
                         capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _repo, url = yum_repo
    cli = Cli(tmp_path / "store", tmp_path / "cache", capfd)
    monkeypatch.setenv("PROVISION_TEST_SBOM_YUM", url)
    spec = tmp_path / "spec" / "toy.yaml"
    spec.parent.mkdir()
    spec.write_text(RPM_SPEC.replace("{key}", f"{url}RPM-GPG-KEY-provision-test"))
    digest = cli.json("build", str(spec))["digest"]
    root = Path(cli.json("fetch", f"toy@{digest}")["root"])
    lock = read_lock(spec.with_suffix(".lock"))
    # spdx-tools accepts no http://127.0.0.1 download location: name a mirror it accepts (the
    # SBOM expands ${VAR} in the lock's baseurl as the build does)
    monkeypatch.setenv("PROVISION_TEST_SBOM_YUM", "https://mirror.example.org/toy/")
    before = sorted(p.name for p in (root / "var/lib/rpm").iterdir())
    data = make_sbom(root, lock, name="toy", digest=digest)
    assert make_sbom(root, lock, name="toy", digest=digest) == data
    assert sorted(p.name for p in (root / "var/lib/rpm").iterdir()) == before  # no -wal/-shm

    doc = check(tmp_path, data)
    pkgs = by_name(doc)
    assert len(doc["packages"]) == len(lock.packages) + 1
    assert sorted(pkgs) == sorted(p.name for p in lock.packages)
    for p in lock.packages:
        got = pkgs[p.name]
        assert got["versionInfo"] == p.evr == "1.0-1"
        assert got["checksums"] == [{"algorithm": "SHA256", "checksumValue": p.sha256}]
        assert got["downloadLocation"] == "https://mirror.example.org/toy/" + p.path
        assert got["externalRefs"][0]["referenceLocator"] == f"pkg:rpm/{p.name}@1.0-1?arch={p.arch}"
        assert got["sourceInfo"] == f"built from source rpm {p.name}-1.0-1.src.rpm"
    # the License tags of tests/yumrepo.py's packages
    assert pkgs["toybox"]["licenseDeclared"] == "GPL-2.0-only"
    assert {pkgs[n]["licenseDeclared"] for n in ("setup", "filesystem", "demo-tools")} == {"MIT"}
    assert "hasExtractedLicensingInfos" not in doc
    assert doc["packages"][0]["versionInfo"] == digest
    assert sbom_summary(data) == {"packages": 4, "declared": 4, "noassertion": 0,
                                  "licenses": {"GPL-2.0-only": 1, "MIT": 3}}


def test_free_text_helpers_stay_small() -> None:
    # the Debian copyright reader ignores what is not a Files paragraph's first License line
    text = textwrap.dedent(f"""\
        {DEP5.strip()}
        License: GPL-3+

        Files: *
        Copyright: x
        License: Zlib
         License: MIT
        """)
    assert expr(debian_copyright_license(text)) == "Zlib"
    assert debian_copyright_license("Format: something else\n\nFiles: *\nLicense: MIT\n") is None
