"""The publish gate: an environment with a private key, a credential or a forbidden package in it
is not published.

`scan_tree` checks a root before it is archived, `scan_archive` a chroot archive before it is
uploaded; both run the same rules and return the same sorted Findings (one per path and rule; one
per forbidden package). `enforce` turns what the spec's `allow:` list leaves into a GateError that
names every path and rule.

Rules (Rule): forbidden-package (the spec's `forbidden` globs against the installed packages);
private-key (PEM and OpenSSH keys: a BEGIN line, base64 lines and the matching END line; PGP
private key blocks; PuTTY key files); ssh-host-key (/etc/ssh/ssh_host_*_key); aws-credentials
(.aws/credentials or config with a secret key, or an AKIA access key id next to a 40-character
secret anywhere); gcp-credentials (a "private_key" JSON field holding a key); netrc,
git-credentials, npm-token, pypi-credentials, docker-auth (those files, when they hold a password
or token); token (GitHub, GitLab and Slack tokens in any file).

Every regular file is read once, in chunks, and searched with one literal-prefixed bytes regex
per rule family; no file is skipped for its size (the holes of sparse files are not read). Files
are opened relative to their directory with O_NOFOLLOW: no symlink is followed and nothing outside
the root is read. A credential file (.netrc, .npmrc, ...) is parsed from its first SPECIAL_CAP
bytes. Keys compiled into ELF objects and static libraries are not private-key findings: they are
the library's own test vectors (GnuTLS's FIPS self-tests), public with its package.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from provision.errors import ProvisionError
from provision.spec import Allow
from provision.unpack import tar_stream
from provision.validate import root_packages

log = logging.getLogger("provision.gate")

CHUNK = 1 << 20
SPECIAL_CAP = 1 << 20  # how much of a credential file (.netrc, .npmrc, ...) is parsed
# The longest match a content rule must see whole (an armored key block of up to 4000 lines; an
# RSA-16384 key is 13 KB): a candidate closer than this to the end of what was read waits for the
# next chunk. Candidates are looked for once: the overlap is not searched twice.
_MAX_MATCH = 512 << 10
_BACK = 1024  # how far rules look back from a candidate (the "private_key" JSON field)
_NEAR = 512  # how far from an AWS access key id its secret key may be
_DRAIN_LIMIT = 16 << 20

_DEB_DB = "/var/lib/dpkg/status"
_RPM_DB = "/var/lib/rpm"
_RPM_DB_DIRS = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")


class Rule(StrEnum):
    FORBIDDEN_PACKAGE = "forbidden-package"
    PRIVATE_KEY = "private-key"
    SSH_HOST_KEY = "ssh-host-key"
    AWS_CREDENTIALS = "aws-credentials"
    GCP_CREDENTIALS = "gcp-credentials"
    NETRC = "netrc"
    GIT_CREDENTIALS = "git-credentials"
    NPM_TOKEN = "npm-token"  # noqa: S105 (a rule name)
    PYPI_CREDENTIALS = "pypi-credentials"
    DOCKER_AUTH = "docker-auth"
    TOKEN = "token"  # noqa: S105 (a rule name)


@dataclass(frozen=True, order=True)
class Finding:
    path: str  # absolute inside the root, e.g. "/root/.ssh/id_rsa"
    rule: str  # a Rule value
    detail: str  # what was found and where; never the secret itself


class GateError(ProvisionError):
    """The gate found something: `problems` has one `PATH: RULE: detail` line per finding."""

    def __init__(self, name: str, findings: Sequence[Finding]) -> None:
        self.name = name
        self.findings = list(findings)
        self.problems = [f"{f.path}: {f.rule}: {f.detail}" for f in self.findings]
        n = len(self.findings)
        super().__init__(f"publish gate: {n} finding{'' if n == 1 else 's'} in {name} "
                         f"(allow one with the spec's allow: list, with a reason)")


# --------------------------------------------------------------------------- public API

def scan_tree(root: Path, *, forbidden: Sequence[str] = (), allow: Sequence[Allow] = (),
              exclude: Sequence[str] = ()) -> list[Finding]:
    """Check the tree at `root` (what `write_archive(root, ..., exclude=exclude)` would publish:
    `exclude` holds the same absolute in-root glob patterns). Returns the findings the allow-list
    does not cover, sorted. Raises ProvisionError if a file cannot be read (the gate fails closed)."""
    findings: list[Finding] = []
    if forbidden:
        findings += _forbidden(*_tree_packages(root), forbidden)
    walker = _TreeWalker(root, exclude)
    walker.walk()
    findings += walker.findings
    return _after_allow(findings, allow, str(root))


def scan_archive(archive: Path, *, packages: Sequence[str] | None = None,
                 forbidden: Sequence[str] = (), allow: Sequence[Allow] = ()) -> list[Finding]:
    """Check a chroot archive (zstd or xz compressed tar, told apart by magic bytes) with the
    same rules as scan_tree, streaming it through the decompressor without unpacking it.

    The forbidden-package rule checks `packages` (names, or the index's "name evr arch" lines)
    if given; else it reads the archive's own dpkg status or rpm database (only those members are
    written to a temporary directory). Raises ArchiveError if the archive is not a valid
    compressed tar stream."""
    want_db = bool(forbidden) and packages is None
    with tempfile.TemporaryDirectory(prefix="provision-gate-") as tmp:
        dbroot = Path(tmp)
        scanner = _ArchiveScanner(archive, dbroot if want_db else None)
        findings = scanner.scan()
        if want_db:
            findings += _forbidden(*_archive_packages(dbroot, archive), forbidden)
        elif forbidden and packages is not None:
            dbpath = _RPM_DB if scanner.rpm_db and not scanner.deb_db else _DEB_DB
            findings += _forbidden(dbpath, [p.split()[0] for p in packages if p.split()], forbidden)
    return _after_allow(findings, allow, str(archive))


def apply_allow(findings: Sequence[Finding], allow: Sequence[Allow]
                ) -> tuple[list[Finding], list[Allow]]:
    """(the findings no allow entry covers, the allow entries that covered nothing). An entry
    covers the findings on its path: of its rule if it names one, else of every rule."""
    def covers(a: Allow, f: Finding) -> bool:
        return posixpath.normpath(a.path) == f.path and (a.rule is None or a.rule == f.rule)

    kept = [f for f in findings if not any(covers(a, f) for a in allow)]
    unused = [a for a in allow if not any(covers(a, f) for f in findings)]
    return kept, unused


def enforce(findings: Sequence[Finding], name: str) -> None:
    """Raise GateError if any findings (left after the allow-list) remain."""
    if findings:
        raise GateError(name, sorted(findings))


def _after_allow(findings: list[Finding], allow: Sequence[Allow], what: str) -> list[Finding]:
    kept, unused = apply_allow(sorted(set(findings)), allow)
    rules = set(Rule)
    for a in unused:
        if a.rule is not None and a.rule not in rules:
            log.warning("allow entry %s names no gate rule %r (rules: %s)", a.path, a.rule,
                        ", ".join(sorted(rules)))
        else:
            rule = f" (rule {a.rule})" if a.rule else ""
            log.warning("allow entry %s%s matched nothing in %s", a.path, rule, what)
    return kept


# --------------------------------------------------------------------------- forbidden packages

def _forbidden(dbpath: str, names: Sequence[str], globs: Sequence[str]) -> list[Finding]:
    return [Finding(dbpath, str(Rule.FORBIDDEN_PACKAGE), f"installed package {n} matches forbidden {g!r}")
            for n in sorted(set(names)) for g in globs if fnmatch.fnmatchcase(n, g)]


def _tree_packages(root: Path) -> tuple[str, list[str]]:
    if (root / _DEB_DB.lstrip("/")).is_file():
        return _DEB_DB, list(root_packages(root, "deb").packages)
    for d in _RPM_DB_DIRS:
        src = root / d.lstrip("/")
        if src.is_dir() and not src.is_symlink():
            if d == _RPM_DB:
                return _RPM_DB, list(root_packages(root, "rpm").packages)
            with tempfile.TemporaryDirectory(prefix="provision-gate-") as tmp:
                dst = Path(tmp) / _RPM_DB.lstrip("/")
                dst.mkdir(parents=True)
                for f in src.iterdir():
                    if f.is_file() and not f.is_symlink():
                        shutil.copy2(f, dst / f.name)
                return _RPM_DB, list(root_packages(Path(tmp), "rpm").packages)
    raise ProvisionError(f"publish gate: cannot check forbidden packages: {root} has neither a "
                         f"dpkg nor an rpm database")


def _archive_packages(dbroot: Path, archive: Path) -> tuple[str, list[str]]:
    if (dbroot / _DEB_DB.lstrip("/")).is_file():
        return _DEB_DB, list(root_packages(dbroot, "deb").packages)
    if (dbroot / _RPM_DB.lstrip("/")).is_dir():
        return _RPM_DB, list(root_packages(dbroot, "rpm").packages)
    raise ProvisionError(f"publish gate: cannot check forbidden packages: {archive} has neither "
                         f"a dpkg nor an rpm database")


def _db_member(path: str) -> str | None:
    """Where a package database file of the archive goes under the temporary root, if it is one."""
    if path == _DEB_DB:
        return path
    for d in _RPM_DB_DIRS:
        if posixpath.dirname(path) == d:
            return f"{_RPM_DB}/{posixpath.basename(path)}"
    return None


# --------------------------------------------------------------------------- content rules

_B64_LINE_CHARS = re.compile(rb"[^A-Za-z0-9+/=]")
_PEM = re.compile(
    rb"-----BEGIN (?P<type>(?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?)-----[ \t]{0,4}"
    # A real line break, or an escaped one inside a string (JSON, source code).
    rb"(?P<nl>\r?\n|\\r\\n|\\n)"
    # RFC 1421 / RFC 4880 armor headers (Proc-Type, DEK-Info, Version, Comment) and a blank line.
    rb"(?:[ \t]{0,16}[A-Za-z][A-Za-z0-9-]{0,40}:[^\r\n\\]{0,200}(?P=nl)){0,8}"
    rb"(?:[ \t]{0,16}(?P=nl))?"
    rb"(?P<body>(?:[ \t]{0,16}[A-Za-z0-9+/=]{1,100}[ \t]{0,4}(?P=nl)){1,4000})"
    rb"[ \t]{0,16}-----END (?P=type)-----"
)
_MIN_KEY_BODY = 40  # base64 characters; a PKCS#8 Ed25519 key has 64
_PEM_KINDS = {
    b"RSA PRIVATE KEY": "RSA private key",
    b"EC PRIVATE KEY": "EC private key",
    b"DSA PRIVATE KEY": "DSA private key",
    b"OPENSSH PRIVATE KEY": "OpenSSH private key",
    b"ENCRYPTED PRIVATE KEY": "encrypted PKCS#8 private key",
    b"PRIVATE KEY": "PKCS#8 private key",
    b"PGP PRIVATE KEY BLOCK": "PGP private key block",
}
_GCP_FIELD = re.compile(rb'"private_key"\s*:\s*"$')
_PUTTY = re.compile(rb"\A(?:\xef\xbb\xbf)?PuTTY-User-Key-File-[23]: [A-Za-z0-9-]+\r?\n"
                    rb"Encryption: [A-Za-z0-9-]+\r?\n")
_PUTTY_PRIVATE = re.compile(rb"\r?\nPrivate-Lines: [0-9]+\r?\n[A-Za-z0-9+/=]{16,}")
# Tokens with a fixed prefix; the prefix 'g' lets the regex engine skip ahead quickly.
_GIT_HOSTS = re.compile(rb"g(?:h[pousr]_[A-Za-z0-9]{36}|ithub_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}"
                        rb"|lpat-[A-Za-z0-9_-]{20,80})")
_SLACK = re.compile(rb"xox[bpars]-[0-9]{1,16}-[0-9A-Za-z-]{10,250}")
_AWS_KEY_ID = re.compile(rb"AKIA[0-9A-Z]{16}")
_AWS_SECRET = re.compile(rb"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_UPPER_DIGIT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_DIGIT = frozenset(b"0123456789")

# (prefix, how much of the token is shown: only its fixed prefix, what it is); most specific first.
_TOKEN_KINDS = ((b"github_pat_", 11, "GitHub fine-grained"), (b"glpat-", 6, "GitLab"),
                (b"gh", 4, "GitHub"), (b"xox", 5, "Slack"))

_Handler = Callable[["_Content", bytes, int], None]


class _Content:
    """The content rules over one file, fed in order; `hits` maps a rule to its first detail.

    Each pass is one regex over each byte. A candidate within _MAX_MATCH of the end of what was
    fed waits for the next piece, so a match across two reads is seen whole; the last _BACK bytes
    before the unexamined part are kept for rules that look back.
    """

    def __init__(self) -> None:
        self.hits: dict[str, str] = {}
        self._tail = b""
        self._base = 0  # file offset of the buffer's first byte
        self._pending = 0  # buffer index from which candidates are still to be examined
        self._started = False
        self._object = False  # an ELF object or ar archive (see _pem)

    def feed(self, data: bytes) -> None:
        self._scan(self._tail + data if self._tail else data, final=False)

    def close(self) -> None:
        self._scan(self._tail, final=True)

    def skip_to(self, offset: int) -> None:
        """A hole (zeros) up to `offset`: nothing can match across it."""
        self.close()
        self._base, self._pending = offset, 0

    def _hit(self, rule: Rule, detail: str) -> None:
        self.hits.setdefault(rule, detail)

    def _scan(self, buf: bytes, *, final: bool) -> None:
        if not self._started and (buf or final):
            self._started = True
            self._object = buf.startswith((b"\x7fELF", b"!<arch>\n"))
            if (buf.startswith((b"PuTTY", b"\xef\xbb\xbfPuTTY")) and _PUTTY.match(buf)
                    and _PUTTY_PRIVATE.search(buf, 0, _MAX_MATCH)):
                self._hit(Rule.PRIVATE_KEY, "PuTTY private key at byte 0")
        limit = len(buf) if final else max(self._pending, len(buf) - _MAX_MATCH)
        # A trigger that starts before `limit` ends before `end`.
        end = min(len(buf), limit + _TRIGGER_LEN)
        for rules, trigger, handler in _PASSES:
            if all(r in self.hits for r in rules):
                continue
            pos = self._pending
            while pos < limit:
                t = trigger.search(buf, pos, end)
                if t is None or t.start() >= limit:
                    break
                handler(self, buf, t.start())
                pos = t.start() + 1
        if final:
            self._base += len(buf)
            self._tail, self._pending = b"", 0
            return
        keep = max(0, limit - _BACK)
        self._tail = buf[keep:]
        self._base += keep
        self._pending = limit - keep

    # Handlers: each gets the buffer and where its trigger starts, in the examined part.

    def _pem(self, buf: bytes, start: int) -> None:
        # A key compiled into an ELF object (or a static library) is the library's own test
        # vector, public with the package: GnuTLS's FIPS self-tests carry PKCS#8 keys. A build
        # leaks keys as files. (Tokens and AWS keys in objects are still found.)
        if self._object:
            return
        m = _PEM.match(buf, start)
        if m is None:
            return
        body = m["body"].replace(m["nl"], b"")
        if len(_B64_LINE_CHARS.sub(b"", body)) < _MIN_KEY_BODY:
            return
        at = self._base + m.start()
        escaped = m["nl"].startswith(b"\\")
        if escaped and _GCP_FIELD.search(buf, max(0, m.start() - _BACK), m.start()):
            self._hit(Rule.GCP_CREDENTIALS, f'service-account key ("private_key") at byte {at}')
            return
        kind = _PEM_KINDS.get(m["type"], m["type"].decode().lower())
        where = " in an escaped string" if escaped else ""
        self._hit(Rule.PRIVATE_KEY, f"{kind}{where} at byte {at}")

    def _git_token(self, buf: bytes, start: int) -> None:
        self._token(buf, _GIT_HOSTS.match(buf, start))

    def _slack_token(self, buf: bytes, start: int) -> None:
        self._token(buf, _SLACK.match(buf, start))

    def _token(self, buf: bytes, m: re.Match[bytes] | None) -> None:
        if m is None:
            return
        s, e = m.span()
        if (s and buf[s - 1] in _WORD) or (e < len(buf) and buf[e] in _WORD):
            return
        text = m[0]
        for prefix, shown_len, what in _TOKEN_KINDS:
            if text.startswith(prefix):
                shown = text[:shown_len].decode()
                self._hit(Rule.TOKEN, f"{what} token ({shown}...) at byte {self._base + s}")
                return

    def _aws(self, buf: bytes, start: int) -> None:
        m = _AWS_KEY_ID.match(buf, start)
        if m is None:
            return
        s, e = m.span()
        if (s and buf[s - 1] in _UPPER_DIGIT) or (e < len(buf) and buf[e] in _UPPER_DIGIT):
            return
        if m[0].endswith(b"EXAMPLE"):  # the documentation's AKIAIOSFODNN7EXAMPLE
            return
        for sm in _AWS_SECRET.finditer(buf, max(0, s - _NEAR), min(len(buf), e + _NEAR)):
            secret = sm[0]
            chars = set(secret)
            if b"EXAMPLE" not in secret and chars & _UPPER and chars & _LOWER and chars & _DIGIT:
                self._hit(Rule.AWS_CREDENTIALS,
                          f"access key id AKIA... next to a secret key at byte {self._base + s}")
                return


# One pass per trigger: a literal-prefixed regex the engine scans for quickly (an alternation
# without a common prefix is ten times slower); the handler checks the whole pattern there.
_PASSES: tuple[tuple[tuple[Rule, ...], re.Pattern[bytes], _Handler], ...] = (
    ((Rule.PRIVATE_KEY, Rule.GCP_CREDENTIALS), re.compile(rb"-----BEGIN "), _Content._pem),
    ((Rule.TOKEN,), re.compile(rb"g(?:h[pousr]_|ithub_pat_|lpat-)"), _Content._git_token),
    ((Rule.TOKEN,), re.compile(rb"xox[bpars]-"), _Content._slack_token),
    ((Rule.AWS_CREDENTIALS,), re.compile(rb"AKIA"), _Content._aws),
)
_TRIGGER_LEN = 16  # longer than any trigger


# --------------------------------------------------------------------------- path rules

_SSH_HOST_KEY = "/etc/ssh/ssh_host_*_key"


def _path_rule(path: str) -> Rule | None:
    """The rule a file is subject to because of its name (its content decides if it hits)."""
    parent, name = posixpath.split(path)
    pname = posixpath.basename(parent)
    if fnmatch.fnmatchcase(path, _SSH_HOST_KEY):
        return Rule.SSH_HOST_KEY
    if pname == ".aws" and name in ("credentials", "config"):
        return Rule.AWS_CREDENTIALS
    if name in (".netrc", "_netrc"):
        return Rule.NETRC
    if name == ".git-credentials" or path.endswith("/.config/git/credentials"):
        return Rule.GIT_CREDENTIALS
    if name in (".npmrc", "npmrc"):
        return Rule.NPM_TOKEN
    if name == ".pypirc":
        return Rule.PYPI_CREDENTIALS
    if (pname, name) in ((".docker", "config.json"), ("containers", "auth.json")):
        return Rule.DOCKER_AUTH
    return None


_AWS_FILE = re.compile(rb"(?im)^[ \t]*(aws_secret_access_key|aws_session_token)[ \t]*=[ \t]*\S")
_NETRC = re.compile(rb"(?:^|\s)password\s+\S")
_GIT_CRED = re.compile(rb"(?m)^[ \t]*[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:[^\s/@]+@")
_NPM = re.compile(rb"(?m)^[ \t]*(?:[^\s=#;]*:)?(_authToken|_auth|_password)[ \t]*=[ \t]*(?!\$\{)\S")
_PYPIRC = re.compile(rb"(?m)^[ \t]*password[ \t]*[=:][ \t]*\S")
_DOCKER_AUTH = re.compile(rb'"(auth|identitytoken)"\s*:\s*"[^"]+"')


def _docker_auth(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeError):
        m = _DOCKER_AUTH.search(data)
        return f"an {m[1].decode()} entry" if m else None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for host, entry in sorted(auths.items()):
        if isinstance(entry, dict) and any(isinstance(entry.get(k), str) and entry[k]
                                           for k in ("auth", "identitytoken")):
            return f"registry credentials for {host}"
    return None


def _special(rule: Rule, data: bytes) -> str | None:
    """What a credential file holds, by its rule; None when it holds no secret."""
    if rule is Rule.AWS_CREDENTIALS:
        m = _AWS_FILE.search(data)
        return f"shared credentials file with {m[1].decode().lower()}" if m else None
    if rule is Rule.NETRC:
        return "netrc entry with a password" if _NETRC.search(data) else None
    if rule is Rule.GIT_CREDENTIALS:
        return "stored URL with user:token@" if _GIT_CRED.search(data) else None
    if rule is Rule.NPM_TOKEN:
        m = _NPM.search(data)
        return f"npm registry {m[1].decode()} set" if m else None
    if rule is Rule.PYPI_CREDENTIALS:
        return "index password set" if _PYPIRC.search(data) else None
    if rule is Rule.DOCKER_AUTH:
        return _docker_auth(data)
    return None


def _file_findings(path: str, hits: dict[str, str], rule: Rule | None, head: bytes | None,
                   size: int) -> list[Finding]:
    found = dict(hits)
    if rule is Rule.SSH_HOST_KEY:
        if size:
            found.pop(Rule.PRIVATE_KEY, None)  # the same key, said better
            found[Rule.SSH_HOST_KEY] = ("SSH host private key: every machine made from this "
                                        "environment would share it")
    elif rule is not None and head is not None and (detail := _special(rule, head)) is not None:
        found.setdefault(rule, detail)
    return [Finding(path, str(r), d) for r, d in found.items()]


def _display(path: str) -> str:
    """A path as it is reported: undecodable bytes shown as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- trees

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class _TreeWalker:
    """Walks a root by directory file descriptors: every directory and file is opened relative
    to its parent with O_NOFOLLOW, so no symlink is followed, also not one swapped in meanwhile."""

    def __init__(self, root: Path, exclude: Sequence[str]) -> None:
        self.root = root
        self.exclude = tuple(exclude)
        self.findings: list[Finding] = []
        self._linked: dict[tuple[int, int], dict[str, str]] = {}  # content hits of hardlinks

    def _fail(self, path: str, e: OSError) -> ProvisionError:
        return ProvisionError(f"publish gate: cannot read {self.root}{_display(path)}: "
                              f"{e.strerror or e}")

    def walk(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise self._fail("", e) from e
        try:
            self._dir(fd, "")
        finally:
            os.close(fd)

    def _excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.exclude)

    def _dir(self, dfd: int, rel: str) -> None:
        try:
            with os.scandir(dfd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise self._fail(rel or "/", e) from e
        for entry in entries:
            path = f"{rel}/{entry.name}"
            if self.exclude and self._excluded(path):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        self._dir(fd, path)
                    finally:
                        os.close(fd)
                elif entry.is_file(follow_symlinks=False):
                    self._file(dfd, entry.name, path)
            except OSError as e:
                raise self._fail(path, e) from e

    def _file(self, dfd: int, name: str, path: str) -> None:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            rule = _path_rule(path)
            key = (st.st_dev, st.st_ino)
            cached = self._linked.get(key) if st.st_nlink > 1 else None
            head: bytes | None = None
            if cached is not None and (rule is None or rule is Rule.SSH_HOST_KEY):
                hits = cached  # another name of a file read already; its name needs no content
            else:
                hits, head = _read_fd(fd, st, capture=rule is not None)
                if st.st_nlink > 1:
                    self._linked[key] = hits
        finally:
            os.close(fd)
        self.findings += _file_findings(_display(path), hits, rule, head, st.st_size)


def _read_fd(fd: int, st: os.stat_result, *, capture: bool) -> tuple[dict[str, str], bytes | None]:
    """Run the content rules over a file once; also return its head if asked to."""
    content = _Content()
    head = bytearray() if capture else None
    for offset, length in _extents(fd, st):
        if offset:
            content.skip_to(offset)
            os.lseek(fd, offset, os.SEEK_SET)
        while length > 0:
            data = os.read(fd, min(CHUNK, length))
            if not data:
                break
            length -= len(data)
            content.feed(data)
            if head is not None and offset == 0 and len(head) < SPECIAL_CAP:
                head += data[: SPECIAL_CAP - len(head)]
    content.close()
    return content.hits, bytes(head) if head is not None else None


def _extents(fd: int, st: os.stat_result) -> Iterator[tuple[int, int]]:
    """The (offset, length) of a file's data: the whole file, or only its data extents if it is
    sparse (its holes read as zeros, in which nothing matches)."""
    if st.st_blocks * 512 >= st.st_size or not hasattr(os, "SEEK_DATA"):
        yield 0, st.st_size
        return
    pos = 0
    while pos < st.st_size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


# --------------------------------------------------------------------------- archives

def _member_path(name: str) -> str:
    return "/" + "/".join(p for p in name.split("/") if p not in ("", "."))


class _ArchiveScanner:
    def __init__(self, archive: Path, dbroot: Path | None) -> None:
        self.archive = archive
        self.dbroot = dbroot
        self.findings: list[Finding] = []
        self.deb_db = False  # the archive has /var/lib/dpkg/status
        self.rpm_db = False  # the archive has an rpm database
        # member path -> (content hits, size) of the regular files so far, for hardlinks to them
        self._seen: dict[str, tuple[dict[str, str], int]] = {}

    def scan(self) -> list[Finding]:
        with tar_stream(self.archive) as tf:
            for member in tf:
                self._member(tf, member)
        return self.findings

    def _member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path = _member_path(member.name)
        if member.islnk():
            # Its content was scanned under the target's name; a rule that needs the content
            # of a credential file sees it only under that name.
            hits, size = self._seen.get(_member_path(member.linkname), ({}, 0))
            self.findings += _file_findings(_display(path), hits, _path_rule(path), None, size)
            return
        if not member.isreg():
            return
        rule = _path_rule(path)
        db = _db_member(path)
        if db is not None:
            self.deb_db |= db == _DEB_DB
            self.rpm_db |= db != _DEB_DB
            if self.dbroot is None:
                db = None
        f = tf.extractfile(member)
        assert f is not None
        # The unbuffered reader under the BufferedReader: it reads without an extra copy and
        # seeks over the holes of a sparse member (the stream below only ever moves forward).
        raw: IO[bytes] = getattr(f, "raw", f)
        with contextlib.ExitStack() as stack:
            out: IO[bytes] | None = None
            if db is not None and self.dbroot is not None:
                dest = self.dbroot / db.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(dest.open("wb"))
            content = _Content()
            head = bytearray() if rule is not None else None
            # (offset, length) of the data of a sparse member (typeshed calls it bytes: it is not)
            extents: list[tuple[int, int]] = getattr(member, "sparse", None) or [(0, member.size)]
            for offset, length in extents:
                if offset:
                    content.skip_to(offset)
                    raw.seek(offset)
                    if out is not None:
                        out.seek(offset)
                left = length
                while left > 0:
                    data = raw.read(min(CHUNK, left))
                    if not data:
                        break
                    left -= len(data)
                    content.feed(data)
                    if out is not None:
                        out.write(data)
                    if head is not None and offset == 0 and len(head) < SPECIAL_CAP:
                        head += data[: SPECIAL_CAP - len(head)]
            if out is not None:
                out.truncate(member.size)
            content.close()
        self._seen[path] = (content.hits, member.size)
        self.findings += _file_findings(_display(path), content.hits, rule,
                                        bytes(head) if head is not None else None, member.size)
