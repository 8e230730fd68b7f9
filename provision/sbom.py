"""SBOM: a built root + its lock -> an SPDX 2.3 JSON document of exactly what was installed.

The package list comes from the root's own package database (dpkg's status, or the rpmdb read
from a copy), checked against the lock: the document describes the locked set or nothing. Each
package carries its lock's sha256 and download URL, its purl, and the license it declares:
rpm's License tag; for deb the License fields of a machine-readable (DEP-5)
/usr/share/doc/PKG/copyright. Known names map to SPDX ids through a small table; any other name
becomes a LicenseRef declared in the document. Nothing here reads the clock: the same root and
lock give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import provision
from provision import run
from provision.errors import ProvisionError, SpecError
from provision.lock import Lock, LockedPackage, join_url
from provision.rpmdb import query_rpmdb
from provision.spec import Family, expand

NOASSERTION = "NOASSERTION"
COPYRIGHT_MAX = 16 << 20  # bytes read of one copyright file
SYMLINK_MAX = 40
MISMATCH_SHOWN = 5


class SbomError(ProvisionError):
    """The root cannot be described: no package database, or one that does not match the lock."""


# --------------------------------------------------------------------------- license names

# SPDX license list ids accepted as they are (SPDX ids match case-insensitively). The GNU
# licenses are spelled out by _gnu() below.
SPDX_IDS = (
    "0BSD", "Apache-1.0", "Apache-1.1", "Apache-2.0", "Artistic-1.0-Perl", "Artistic-2.0",
    "Beerware", "BSD-1-Clause", "BSD-2-Clause", "BSD-3-Clause", "BSD-4-Clause", "BSL-1.0",
    "bzip2-1.0.6", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC0-1.0",
    "CDDL-1.0", "curl", "EPL-1.0", "EPL-2.0", "FSFAP", "FSFUL", "FSFULLR", "FTL", "HPND", "ICU",
    "IJG", "ISC", "Libpng", "libpng-2.0", "MIT", "MIT-0", "MPL-1.1", "MPL-2.0", "MS-PL", "NCSA",
    "OFL-1.1", "OLDAP-2.8", "PSF-2.0", "Python-2.0", "Ruby", "Sleepycat", "Unicode-DFS-2016",
    "Unlicense", "Vim", "W3C", "WTFPL", "X11", "Zlib", "ZPL-2.1",
)  # fmt: skip
SPDX_EXCEPTIONS = (
    "Autoconf-exception-2.0", "Autoconf-exception-3.0", "Bison-exception-2.2",
    "Classpath-exception-2.0", "Font-exception-2.0", "GCC-exception-2.0", "GCC-exception-3.1",
    "Libtool-exception", "Linux-syscall-note", "LLVM-exception",
)  # fmt: skip

# Debian copyright-format short names that are not SPDX ids (lower case).
DEBIAN_NAMES = {
    "expat": "MIT",
    "apache-2": "Apache-2.0",
    "artistic": "Artistic-1.0-Perl",  # /usr/share/common-licenses/Artistic is Perl's text
    "openldap-2.8": "OLDAP-2.8",
}
# The exception of `LICENSE with WORDS exception` (lower case WORDS).
DEBIAN_EXCEPTIONS = {
    "libtool": "Libtool-exception",
    "bison-2.2": "Bison-exception-2.2",
}
# Fedora's pre-SPDX License tags that name exactly one SPDX license. Fedora's own table maps
# LGPLv2+, LGPLv2, BSD and others to several SPDX ids: those stay LicenseRefs here.
FEDORA_NAMES = {
    "GPL+": "GPL-1.0-or-later",
    "GPLv2": "GPL-2.0-only",
    "GPLv2+": "GPL-2.0-or-later",
    "GPLv3": "GPL-3.0-only",
    "GPLv3+": "GPL-3.0-or-later",
    "LGPLv3": "LGPL-3.0-only",
    "LGPLv3+": "LGPL-3.0-or-later",
    "AGPLv3": "AGPL-3.0-only",
    "AGPLv3+": "AGPL-3.0-or-later",
    "ASL 1.1": "Apache-1.1",
    "ASL 2.0": "Apache-2.0",
    "MPLv1.1": "MPL-1.1",
    "MPLv2.0": "MPL-2.0",
    "Artistic 2.0": "Artistic-2.0",
    "Boost": "BSL-1.0",
}

_GNU_RE = re.compile(r"^(A?GPL|LGPL|GFDL)-(\d(?:\.\d)?)(\+|-only|-or-later)?$", re.I)
_GNU_VERSIONS = {
    "GPL": ("1.0", "2.0", "3.0"),
    "LGPL": ("2.0", "2.1", "3.0"),
    "AGPL": ("3.0",),
    "GFDL": ("1.1", "1.2", "1.3"),
}
_ID_RE = re.compile(r"^LicenseRef-[A-Za-z0-9.-]+$")
_KNOWN = {i.casefold(): i for i in SPDX_IDS}
_KNOWN_EXCEPTIONS = {e.casefold(): e for e in SPDX_EXCEPTIONS}


def _gnu(name: str) -> str | None:
    """GPL-2+, GPL-2.0+, GPL-2, GPL-2.0-only, LGPL-2.1+, GFDL-1.3+, ... -> the SPDX id."""
    m = _GNU_RE.match(name)
    if m is None:
        return None
    family, version, suffix = m.group(1).upper(), m.group(2), m.group(3) or ""
    version = version if "." in version else version + ".0"
    if version not in _GNU_VERSIONS[family]:
        return None
    return f"{family}-{version}-{'only' if suffix in ('', '-only') else 'or-later'}"


def spdx_id(name: str, family: Family) -> str | None:
    """The SPDX license id a package's license name stands for, or None (no guess)."""
    name = name.strip()
    known = _KNOWN.get(name.casefold()) or _gnu(name)
    if known:
        return known
    if family is Family.DEB:
        return DEBIAN_NAMES.get(name.casefold())
    return FEDORA_NAMES.get(name)


# A parsed license expression. Known holds an SPDX id (or "ID WITH EXCEPTION"); Unknown holds a
# name no id is known for (it becomes a LicenseRef).

@dataclass(frozen=True)
class Known:
    expr: str


@dataclass(frozen=True)
class Unknown:
    name: str


@dataclass(frozen=True)
class Op:
    op: Literal["AND", "OR"]
    args: tuple[Node, ...]


Node = Known | Unknown | Op


def _key(node: Node) -> str:
    if isinstance(node, Known):
        return node.expr
    if isinstance(node, Unknown):
        return "LicenseRef-" + node.name
    return "(" + f" {node.op} ".join(_key(a) for a in node.args) + ")"


def _op(op: Literal["AND", "OR"], args: Iterable[Node]) -> Node:
    """AND or OR of `args`, in a canonical form: nested alike operators flattened, each operand
    once, operands sorted (both operators are commutative)."""
    flat: dict[str, Node] = {}
    for a in args:
        for b in (a.args if isinstance(a, Op) and a.op == op else (a,)):
            flat.setdefault(_key(b), b)
    nodes = [flat[k] for k in sorted(flat)]
    return nodes[0] if len(nodes) == 1 else Op(op, tuple(nodes))


def _term(name: str, exception: str | None, family: Family) -> Node:
    """One license, perhaps with an exception; unmappable as a whole -> Unknown."""
    base = spdx_id(name, family)
    if exception is None:
        return Known(base) if base else Unknown(name)
    if family is Family.DEB:
        exc = _KNOWN_EXCEPTIONS.get(exception.casefold()) or DEBIAN_EXCEPTIONS.get(exception.casefold())
        whole = f"{name} with {exception} exception"
    else:
        exc = _KNOWN_EXCEPTIONS.get(exception.casefold())
        whole = f"{name} with {exception}"
    return Known(f"{base} WITH {exc}") if base and exc else Unknown(whole)


class _Syntax(Exception):
    pass


def parse_debian_license(synopsis: str) -> Node | None:
    """A copyright-format 1.0 License synopsis: `A or B and C` (and binds tighter), `A or B, and
    C` (a comma lowers the precedence of what follows it), `A with X exception`."""
    text = synopsis.strip()
    if not text:
        return None
    if "(" in text or ")" in text:
        return Unknown(text)
    try:
        return _parse_debian(text)
    except _Syntax:
        return Unknown(text)


def _parse_debian(text: str) -> Node:
    tokens: list[str] = []
    for word in text.split():
        comma = word.endswith(",")
        word = word.rstrip(",")
        if word:
            tokens.append(word)
        if comma:
            tokens.append(",")
    # Split at ", and" / ", or" into groups, each parsed with the ordinary precedence.
    groups: list[list[str]] = [[]]
    joins: list[Literal["AND", "OR"]] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == ",":
            nxt = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
            if nxt not in ("and", "or"):
                raise _Syntax
            joins.append("AND" if nxt == "and" else "OR")
            groups.append([])
            i += 2
            continue
        groups[-1].append(tokens[i])
        i += 1
    node = _debian_group(groups[0])
    for join, group in zip(joins, groups[1:], strict=True):
        node = _op(join, [node, _debian_group(group)])
    return node


def _debian_group(tokens: list[str]) -> Node:
    alternatives: list[Node] = []
    conjuncts: list[Node] = []
    i = 0
    expect_term = True
    while i < len(tokens):
        word = tokens[i]
        low = word.lower()
        if expect_term:
            if low in ("and", "or", "with"):
                raise _Syntax
            exception = None
            if i + 1 < len(tokens) and tokens[i + 1].lower() == "with":
                words: list[str] = []
                j = i + 2
                while j < len(tokens) and tokens[j].lower() != "exception":
                    words.append(tokens[j])
                    j += 1
                if j == len(tokens) or not words:
                    raise _Syntax
                exception = " ".join(words)
                i = j
            conjuncts.append(_term(word, exception, Family.DEB))
            expect_term = False
        elif low == "and":
            expect_term = True
        elif low == "or":
            alternatives.append(_op("AND", conjuncts))
            conjuncts = []
            expect_term = True
        else:
            raise _Syntax
        i += 1
    if expect_term:
        raise _Syntax
    alternatives.append(_op("AND", conjuncts))
    return _op("OR", alternatives)


def parse_rpm_license(tag: str) -> Node | None:
    """An rpm License tag: an SPDX expression (Fedora >= 38, RHEL >= 10) or Fedora's older
    short names (`GPLv2+ and (MIT or ASL 2.0)`); `and` binds tighter than `or`."""
    text = tag.strip()
    if not text or text == "(none)":
        return None
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    pos = 0

    def term() -> Node:
        nonlocal pos
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            node = expr()
            if pos == len(tokens) or tokens[pos] != ")":
                raise _Syntax
            pos += 1
            return node
        words: list[str] = []
        while pos < len(tokens) and tokens[pos] not in ("(", ")") and \
                tokens[pos].lower() not in ("and", "or"):
            words.append(tokens[pos])
            pos += 1
        if not words:
            raise _Syntax
        low = [w.lower() for w in words]
        if "with" in low:
            k = low.index("with")
            if k == 0 or k == len(words) - 1:
                raise _Syntax
            return _term(" ".join(words[:k]), " ".join(words[k + 1:]), Family.RPM)
        return _term(" ".join(words), None, Family.RPM)

    def conj() -> Node:
        nonlocal pos
        args = [term()]
        while pos < len(tokens) and tokens[pos].lower() == "and":
            pos += 1
            args.append(term())
        return _op("AND", args)

    def expr() -> Node:
        nonlocal pos
        args = [conj()]
        while pos < len(tokens) and tokens[pos].lower() == "or":
            pos += 1
            args.append(conj())
        return _op("OR", args)

    try:
        node = expr()
        if pos != len(tokens):
            raise _Syntax
    except _Syntax:
        return Unknown(text)
    return node


def unmapped_names(node: Node | None) -> Iterable[str]:
    """The license names in `node` that no SPDX id stands for (each becomes a LicenseRef)."""
    if isinstance(node, Unknown):
        yield node.name
    elif isinstance(node, Op):
        for a in node.args:
            yield from unmapped_names(a)


def _ref_stem(name: str) -> str:
    if _ID_RE.match(name):
        return name[len("LicenseRef-"):]
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", name.replace("+", "-plus-")).strip("-")
    return stem or "unnamed"


def license_refs(names: Iterable[str]) -> dict[str, str]:
    """name -> LicenseRef id. Names that differ only in spelling (case, punctuation) share one
    id: LicenseRef ids are compared without regard to case."""
    groups: dict[str, list[str]] = {}
    for n in sorted(set(names)):
        groups.setdefault(_ref_stem(n).casefold(), []).append(n)
    refs: dict[str, str] = {}
    for members in groups.values():
        ref = "LicenseRef-" + min(_ref_stem(n) for n in members)
        refs.update((n, ref) for n in members)
    return refs


def render(node: Node, refs: Mapping[str, str], top: bool = True) -> str:
    if isinstance(node, Known):
        return node.expr
    if isinstance(node, Unknown):
        return refs[node.name]
    text = f" {node.op} ".join(render(a, refs, top=False) for a in node.args)
    return text if top else f"({text})"


# --------------------------------------------------------------------------- reading the root

def in_root(root: Path, path: str) -> Path | None:
    """`path` (absolute inside the root) resolved as the root itself would see it, following
    symlinks within the root; None if it does not exist, loops, or leaves the root."""
    todo = [c for c in path.split("/") if c not in ("", ".")]
    todo.reverse()
    parts: list[str] = []
    hops = 0
    while todo:
        c = todo.pop()
        if c == "..":
            if not parts:
                return None
            parts.pop()
            continue
        here = root.joinpath(*parts, c)
        try:
            st = os.lstat(here)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > SYMLINK_MAX:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                parts = []
            todo.extend(reversed([t for t in target.split("/") if t not in ("", ".")]))
            continue
        parts.append(c)
    return root.joinpath(*parts)


def _read_in_root(root: Path, path: str) -> str | None:
    p = in_root(root, path)
    if p is None:
        return None
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(COPYRIGHT_MAX).decode(errors="replace")


_DEP5_FORMAT = re.compile(r"^\s*https?://(www\.debian\.org/doc/packaging-manuals/copyright-format/1\.0"
                          r"|dep\.debian\.net/deps/dep5)/?\s*$", re.I)


def _paragraphs(text: str) -> list[dict[str, str]]:
    """deb822 paragraphs: field name (lower case) -> the first line of its value."""
    out: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                out.append(fields)
            fields = {}
        elif line[0] in " \t#":
            continue
        elif ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip().lower(), value.strip())
    if fields:
        out.append(fields)
    return out


def debian_copyright_license(text: str) -> Node | None:
    """The licenses of a machine-readable copyright file's Files paragraphs; None if the file
    is not machine-readable or names no license."""
    paras = _paragraphs(text)
    if not paras or not _DEP5_FORMAT.match(paras[0].get("format", "")):
        return None
    nodes = [n for p in paras[1:] if "files" in p
             for n in [parse_debian_license(p.get("license", ""))] if n is not None]
    if not nodes:
        return None
    return _op("AND", nodes)


@dataclass(frozen=True)
class Installed:
    name: str
    arch: str
    evr: str
    source: str  # sourceInfo
    supplier: str | None
    license: Node | None


_FIELD = "\x1f"
_RECORD = "\x1e"
DPKG_FIELDS = ("${Package}", "${Architecture}", "${Version}", "${db:Status-Status}",
               "${source:Package}", "${source:Version}", "${Maintainer}")
RPM_FIELDS = ("%{NAME}", "%{ARCH}", "%|EPOCH?{%{EPOCH}}:{0}|", "%{VERSION}", "%{RELEASE}",
              "%|LICENSE?{%{LICENSE}}:{}|", "%|VENDOR?{%{VENDOR}}:{}|",
              "%|SOURCERPM?{%{SOURCERPM}}:{}|")
ABSENT = ("not-installed", "config-files")  # dpkg states whose files are not in the root


def _records(out: str, n: int, tool: str) -> list[list[str]]:
    rows = []
    for rec in out.split(_RECORD):
        if not rec.strip():
            continue
        fields = rec.lstrip("\n").split(_FIELD)
        if len(fields) != n:
            raise SbomError(f"{tool} printed a record of {len(fields)} fields, not {n}: {rec[:80]!r}")
        rows.append(fields)
    return rows


def _supplier(who: str) -> str | None:
    who = who.strip()
    m = re.match(r"^(.*?)\s*<([^<>]*)>$", who)
    name, email = (m.group(1), m.group(2)) if m else (who, "")
    name = re.sub(r"[()]", "", name).strip()
    if not name or name == "(none)":
        return None
    email = re.sub(r"[()]", "", email).strip()
    return f"Organization: {name} ({email})" if email else f"Organization: {name}"


def deb_installed(root: Path) -> list[Installed]:
    admin = root / "var/lib/dpkg"
    if not (admin / "status").is_file():
        raise SbomError(f"{root} has no dpkg database ({admin}/status)")
    out = run.output(["dpkg-query", f"--admindir={admin}", "-W",
                      "-f", _FIELD.join(DPKG_FIELDS) + _RECORD])
    found = []
    for name, arch, version, state, src, src_version, maint in _records(out, len(DPKG_FIELDS), "dpkg-query"):
        if state in ABSENT:
            continue
        text = None
        if "/" not in name and name not in (".", ".."):
            text = _read_in_root(root, f"/usr/share/doc/{name}/copyright")
        found.append(Installed(
            name=name, arch=arch, evr=version,
            source=f"built from Debian source package {src} {src_version or version}",
            supplier=_supplier(maint),
            license=debian_copyright_license(text) if text is not None else None))
    return found


def rpm_installed(root: Path) -> list[Installed]:
    """Query a copy of the rpmdb: rpm's sqlite leaves -wal/-shm files even for a query."""
    dbdir = in_root(root, "/usr/lib/sysimage/rpm")
    if dbdir is None or not dbdir.is_dir() or not any(dbdir.iterdir()):
        dbdir = in_root(root, "/var/lib/rpm")
    if dbdir is None or not dbdir.is_dir():
        raise SbomError(f"{root} has no rpm database (var/lib/rpm)")
    out = query_rpmdb(dbdir, _FIELD.join(RPM_FIELDS) + _RECORD, SbomError)
    found = []
    for name, arch, epoch, version, release, lic, vendor, srpm in _records(out, len(RPM_FIELDS), "rpm"):
        if name == "gpg-pubkey":
            continue
        e = f"{epoch}:" if epoch not in ("0", "(none)", "") else ""
        found.append(Installed(
            name=name, arch=arch, evr=f"{e}{version}-{release}",
            source=f"built from source rpm {srpm}" if srpm else "no source rpm recorded",
            supplier=_supplier(vendor), license=parse_rpm_license(lic)))
    return found


def _check_against_lock(root: Path, lock: Lock, installed: list[Installed]
                        ) -> list[tuple[Installed, LockedPackage]]:
    locked = {(p.name, p.arch): p for p in lock.packages}
    seen: set[tuple[str, str]] = set()
    pairs: list[tuple[Installed, LockedPackage]] = []
    extra: list[str] = []
    other: list[str] = []
    for i in installed:
        key = (i.name, i.arch)
        p = locked.get(key)
        if p is None or key in seen:
            extra.append(f"{i.name} {i.evr} {i.arch}")
        elif p.evr != i.evr:
            other.append(f"{i.name} {i.arch} (installed {i.evr}, locked {p.evr})")
        else:
            pairs.append((i, p))
        seen.add(key)
    missing = [p.line() for k, p in locked.items() if k not in seen]
    problems = []
    for what, items in (("not in the lock", extra), ("locked but not installed", missing),
                        ("another version", other)):
        if items:
            items = sorted(items)
            more = f" and {len(items) - MISMATCH_SHOWN} more" if len(items) > MISMATCH_SHOWN else ""
            problems.append(f"{what}: {', '.join(items[:MISMATCH_SHOWN])}{more}")
    if problems:
        raise SbomError(f"{root} does not hold exactly the packages of lock {lock.name}: "
                        f"{'; '.join(problems)}")
    return sorted(pairs, key=lambda ip: (ip[1].name, ip[1].arch))


# --------------------------------------------------------------------------- the document

def _spdx_ref(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text.replace("+", "plus")).strip("-") or "x"


def purl(lock: Lock, p: LockedPackage) -> str:
    def q(s: str) -> str:
        return urllib.parse.quote(s, safe="").replace("%3A", ":")

    if lock.family is Family.DEB:
        return f"pkg:deb/debian/{q(p.name)}@{q(p.version)}?arch={q(p.arch)}"
    qualifiers = f"arch={q(p.arch)}" + (f"&epoch={p.epoch}" if p.epoch else "")
    return f"pkg:rpm/{q(p.name)}@{q(p.version)}-{q(p.release or '')}?{qualifiers}"


def _repo_urls(lock: Lock) -> dict[str, str | None]:
    """Each repo's base URL with ${VAR} expanded as the build expands it; None if it cannot be,
    or if it is no URL anyone else could download from (a file: URL, a path)."""
    urls: dict[str, str | None] = {}
    for r in lock.repos:
        try:
            url = expand(r.baseurl, f"lock {lock.name}: repo {r.name}")
        except SpecError:
            url = None
        if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https", "ftp"):
            url = None
        urls[r.name] = url
    return urls


def _created(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_sbom(root: Path, lock: Lock, *, name: str, digest: str) -> bytes:
    """An SPDX 2.3 JSON document describing the environment `name` (`digest`) built at `root`
    from `lock`. Raises SbomError if the root's package database and the lock disagree."""
    installed = rpm_installed(root) if lock.family is Family.RPM else deb_installed(root)
    pairs = _check_against_lock(root, lock, installed)
    refs = license_refs(n for i, _ in pairs for n in unmapped_names(i.license))
    ref_users: dict[str, set[str]] = {}
    for i, _ in pairs:
        for n in unmapped_names(i.license):
            ref_users.setdefault(refs[n], set()).add(i.name)
    urls = _repo_urls(lock)

    env_id = "SPDXRef-Environment"
    packages: list[dict[str, Any]] = [{
        "SPDXID": env_id,
        "name": name,
        "versionInfo": digest,
        "supplier": NOASSERTION,
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": False,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "comment": (f"A provision environment ({lock.family.value}, {lock.arch}"
                    f"{', ' + lock.suite if lock.suite else ''}) built from lock {lock.digest()} "
                    f"of spec {lock.spec_digest}."),
    }]
    relationships: list[dict[str, str]] = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
         "relatedSpdxElement": env_id}]
    used: set[str] = {env_id.casefold()}
    for i, p in pairs:
        stem = f"SPDXRef-Package-{_spdx_ref(p.name)}-{_spdx_ref(p.arch)}"
        spdx, count = stem, 1
        while spdx.casefold() in used:
            count += 1
            spdx = f"{stem}-{count}"
        used.add(spdx.casefold())
        base = urls.get(p.repo)
        packages.append({
            "SPDXID": spdx,
            "name": p.name,
            "versionInfo": p.evr,
            "supplier": i.supplier or NOASSERTION,
            "downloadLocation": join_url(base, p.path) if base else NOASSERTION,
            "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": p.sha256}],
            "sourceInfo": i.source,
            "licenseConcluded": NOASSERTION,
            "licenseDeclared": render(i.license, refs) if i.license is not None else NOASSERTION,
            "copyrightText": NOASSERTION,
            "comment": f"architecture {p.arch}",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl(lock, p)}],
        })
        relationships.append({"spdxElementId": env_id, "relationshipType": "CONTAINS",
                              "relatedSpdxElement": spdx})
    where = ("/usr/share/doc/PACKAGE/copyright" if lock.family is Family.DEB
             else "the License tag of the package's rpm header")
    extracted = []
    for ref in sorted(set(refs.values())):
        names = sorted(n for n, r in refs.items() if r == ref)
        quoted = " or ".join(f'"{n}"' for n in names)
        extracted.append({
            "licenseId": ref,
            "name": names[0],
            "extractedText": (f"The license named {quoted} by the package ({where}), for which "
                              f"no SPDX license list identifier is known; see the license text "
                              f"that the package ships. Named by: {', '.join(sorted(ref_users[ref]))}."),
        })
    hex_digest = urllib.parse.quote(digest.split(":", 1)[-1], safe="")
    doc: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name}@{digest}",
        "documentNamespace": (f"https://spdx.org/spdxdocs/provision-"
                              f"{urllib.parse.quote(name, safe='')}-{hex_digest}"),
        "creationInfo": {
            "created": _created(lock.source_date_epoch),
            "creators": [f"Tool: provision-{provision.__version__}"],
        },
        "packages": packages,
        "relationships": relationships,
    }
    if extracted:
        doc["hasExtractedLicensingInfos"] = extracted
    return (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


_TOKEN_RE = re.compile(r"[A-Za-z0-9.+-]+(?:\s+WITH\s+[A-Za-z0-9.+-]+)?")


def sbom_summary(data: bytes) -> dict[str, Any]:
    """Counts for people: packages, how many declare a license, and each license id's uses."""
    doc = json.loads(data)
    pkgs = [p for p in doc.get("packages", []) if p.get("SPDXID") != "SPDXRef-Environment"]
    declared = [p["licenseDeclared"] for p in pkgs if p.get("licenseDeclared") not in (None, NOASSERTION)]
    ids: Counter[str] = Counter()
    for expr in declared:
        ids.update({t for t in _TOKEN_RE.findall(expr) if t not in ("AND", "OR")})
    return {"packages": len(pkgs), "declared": len(declared),
            "noassertion": len(pkgs) - len(declared), "licenses": dict(sorted(ids.items()))}
