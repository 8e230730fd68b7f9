"""The spec: real files under envs/ validate; malformed ones get one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.cli import main
from provision.errors import SpecError
from provision.spec import Family, expand, host_debian_mirror, load_spec

ENVS = Path(__file__).parent.parent / "envs"


@pytest.mark.parametrize("name", ["bookworm-build", "firefox-centos6"])
def test_shipped_specs_validate(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ENVS / f"{name}.yaml")]) == 0
    assert f"ok: {name}" in capsys.readouterr().out


def test_firefox_spec_is_the_historic_one() -> None:
    spec = load_spec(ENVS / "firefox-centos6.yaml")
    assert spec.family is Family.RPM and spec.arch == "x86_64"
    assert all("puppetagain.pub.build.mozilla.org/data/repos/yum" in r.baseurl for r in spec.repos)
    assert "android-sdk*" in spec.forbidden
    # the releng repo was never signed: it opts out, and that is said out loud
    assert any("releng-public" in w for w in spec.warnings)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "env.yaml"
    p.write_text(text)
    return p


def test_every_problem_is_one_line_with_file_line_and_field(tmp_path: Path) -> None:
    p = write(tmp_path, """\
name: Bad Name
family: rpmx
arch: x86_64
repos:
  - name: base
    baseurl: ftp://example.invalid/
    colour: blue
packages: [gcc, "two words"]
users:
  - name: builder
    uid: -5
files:
  - path: relative/path
    content: hi
    mode: rw-r--r--
""")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    problems = e.value.problems
    text = "\n".join(problems)
    assert f"{p}:1: name:" in text
    assert f"{p}:2: family: 'rpmx' is not one of rpm, deb" in text
    assert f"{p}:6: repos[0].baseurl:" in text
    assert f"{p}:7: repos[0].colour: unknown field" in text
    assert f"{p}:8: packages[1]:" in text
    assert f"{p}:11: users[0].uid:" in text
    assert f"{p}:13: files[0].path:" in text
    assert f"{p}:15: files[0].mode:" in text
    assert all("\n" not in line for line in problems)


def test_cli_reports_problems_without_traceback(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "name: [unclosed\n")
    assert main(["check", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"provision: error: {p}:")
    assert "not valid YAML" in err and "Traceback" not in err
    assert main(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read spec" in capsys.readouterr().err


def test_missing_signature_material_is_an_error_and_opting_out_warns(tmp_path: Path) -> None:
    base = "name: x\nfamily: deb\narch: amd64\npackages: [a]\nrepos:\n  - name: d\n" \
           "    baseurl: http://127.0.0.1:9/\n    suite: s\n    components: [main]\n"
    with pytest.raises(SpecError, match="needs a keyring"):
        load_spec(write(tmp_path, base))
    spec = load_spec(write(tmp_path, base + "    trusted: true\n"))
    assert spec.warnings and "trusted: true" in spec.warnings[0]


def test_digest_ignores_formatting_but_not_meaning(tmp_path: Path) -> None:
    a = write(tmp_path, "name: x\nfamily: rpm\narch: x86_64\npackages: [a]\nrepos:\n"
                        "  - {name: r, baseurl: 'http://127.0.0.1:9/', gpgcheck: false}\n")
    d1 = load_spec(a).digest()
    a.write_text("# a comment\n" + a.read_text().replace("packages: [a]", "packages:\n  - a"))
    assert load_spec(a).digest() == d1
    a.write_text(a.read_text().replace("  - a", "  - b"))
    assert load_spec(a).digest() != d1


def test_host_mirror_comes_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.test/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert host_debian_mirror(tmp_path) == "http://mirror.test/debian"
    assert expand("${M}/x", "here", {"M": "http://a"}) == "http://a/x"
    with pytest.raises(SpecError, match=r"\$\{NOPE\} is not set"):
        expand("${NOPE}", "here", {})
    # the machine's own apt sources name a mirror (the tests' deb environment uses it)
    assert host_debian_mirror() is not None


def test_vm_outputs(tmp_path: Path) -> None:
    rpm = ("name: x\nfamily: rpm\narch: x86_64\npackages: [a]\nrepos:\n"
           "  - {name: r, baseurl: 'http://127.0.0.1:9/', gpgcheck: false}\n"
           "outputs: [qcow2]\n")
    with pytest.raises(SpecError, match=r"name its Debian repos in vm\.repos"):
        load_spec(write(tmp_path, rpm))
    spec = load_spec(write(tmp_path, rpm + "vm:\n  repos:\n    - {name: d, baseurl: 'http://127.0.0.1:9/',"
                                            " suite: s, components: [main], trusted: true}\n"))
    assert spec.vm is not None and spec.vm.repos[0].suite == "s"
    assert "dnf" in spec.vm.packages  # the builder makes the rpm chroot with dnf
    deb = ("name: x\nfamily: deb\narch: amd64\npackages: [a]\nrepos:\n"
           "  - {name: d, baseurl: 'http://127.0.0.1:9/', suite: s, components: [main], trusted: true}\n")
    spec = load_spec(write(tmp_path, deb + "outputs: [qcow2, vagrant]\n"))
    assert spec.vm is not None and "linux-image-amd64" in spec.vm.packages
    with pytest.raises(SpecError, match="outputs\\[0\\]: 'iso' is not one of"):
        load_spec(write(tmp_path, deb + "outputs: [iso]\n"))
