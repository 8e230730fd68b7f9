"""Stage 1: the environment spec (YAML) -> a frozen, validated Spec.

Every problem is reported as one line `FILE:LINE: FIELD: what is wrong`; all problems of a file
are reported at once, never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from provision.errors import SpecError


class Family(StrEnum):
    RPM = "rpm"
    DEB = "deb"


class Output(StrEnum):
    """What a build produces. The chroot archive is always made: it is the primary artifact."""

    CHROOT = "chroot"
    QCOW2 = "qcow2"
    VAGRANT = "vagrant"


class Variant(StrEnum):
    """What a deb environment starts from before its packages (as mmdebstrap names them)."""

    ESSENTIAL = "essential"
    APT = "apt"
    REQUIRED = "required"
    BUILDD = "buildd"
    IMPORTANT = "important"


NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PKG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_:~-]*$")


@dataclass(frozen=True)
class Repo:
    name: str
    baseurl: str
    suite: str | None = None
    components: tuple[str, ...] = ()
    keyring: str | None = None
    trusted: bool = False
    gpgkey: tuple[str, ...] = ()
    gpgcheck: bool = True
    # rpm: the repo of the source packages (SRPMs) its packages were built from. Read by
    # `provision sources` only; not part of the spec's digest (it changes nothing built).
    sources: str | None = None

    def verified(self, family: Family) -> bool:
        return self.gpgcheck if family is Family.RPM else not self.trusted


@dataclass(frozen=True)
class Group:
    name: str
    gid: int


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: int = 0o644
    owner: int = 0
    group: int = 0
    source: str | None = None  # the file beside the spec it was read from, if any


@dataclass(frozen=True)
class Allow:
    """A publish-gate finding accepted on purpose: one path (and optionally one rule), with why."""

    path: str
    reason: str
    rule: str | None = None


@dataclass(frozen=True)
class Vm:
    """The builder machine: the environment's packages plus what boots, in a qcow2 image."""

    packages: tuple[str, ...] = ()
    disk_mib: int = 8192
    user: str = "builder"
    memory_mib: int = 2048
    # The builder is a Debian machine. A deb environment's builder comes from the environment's
    # own repos; an rpm environment names Debian repos for its builder here (as mock runs dnf on
    # a non-RHEL host).
    repos: tuple[Repo, ...] = ()


@dataclass(frozen=True)
class Guest:
    """How the guest is configured: Ansible roles (in ansible/roles) and their variables."""

    roles: tuple[str, ...] = ()
    vars: tuple[tuple[str, Any], ...] = ()

    def vars_dict(self) -> dict[str, Any]:
        return dict(self.vars)


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    family: Family
    arch: str
    repos: tuple[Repo, ...]
    packages: tuple[str, ...]
    variant: Variant = Variant.ESSENTIAL
    releasever: str | None = None
    users: tuple[User, ...] = ()
    groups: tuple[Group, ...] = ()
    files: tuple[File, ...] = ()
    exclude: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    compression: str = "zstd"
    outputs: tuple[Output, ...] = (Output.CHROOT,)
    vm: Vm | None = None
    guest: Guest = Guest()
    # Publish-gate exceptions. Not part of the digest: they change nothing that is built.
    allow: tuple[Allow, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def sources(self) -> tuple[str, ...]:
        """Files beside the spec that it reads (relative paths)."""
        return tuple(f.source for f in self.files if f.source)

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(".lock")

    def digest(self) -> str:
        """sha256 of the spec's meaning (not its formatting): comments and key order do not count."""
        data = asdict(self)
        data.pop("path")
        data.pop("warnings")
        data.pop("allow")
        for repo in data["repos"]:
            repo.pop("sources")
        if data["vm"]:
            for repo in data["vm"]["repos"]:
                repo.pop("sources")
        data["files"] = [
            {**f, "content": hashlib.sha256(f["content"]).hexdigest()} for f in data["files"]
        ]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- parsing

T = TypeVar("T")


class _Checker:
    """Walks the YAML node tree, collecting one line per problem with its line number."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def fail(self, node: yaml.Node | None, where: str, msg: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.path}:{line}: {where}: {msg}")

    def mapping(self, node: yaml.Node, where: str, allowed: set[str], required: set[str]
                ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, "must be a mapping")
            return None
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.fail(k, where, "keys must be strings")
                continue
            if key in out:
                self.fail(k, f"{where}.{key}" if where else key, "given twice")
            elif key not in allowed:
                self.fail(k, f"{where}.{key}" if where else key,
                          f"unknown field (known: {', '.join(sorted(allowed))})")
            out[key] = v
        for key in sorted(required - out.keys()):
            self.fail(node, f"{where}.{key}" if where else key, "missing")
        return out

    def string(self, node: yaml.Node, where: str, pattern: re.Pattern[str] | None = None,
               what: str = "") -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.fail(node, where, "must be a string")
            return None
        if not node.value:
            self.fail(node, where, "must not be empty")
            return None
        if pattern is not None and not pattern.match(node.value):
            self.fail(node, where, f"{node.value!r} is not {what or 'valid'}")
            return None
        return str(node.value)

    def integer(self, node: yaml.Node, where: str, lo: int = 0, hi: int = 2**32 - 2) -> int | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int":
            self.fail(node, where, "must be an integer")
            return None
        try:
            value = int(node.value, 0)
        except ValueError:
            self.fail(node, where, "must be an integer")
            return None
        if not lo <= value <= hi:
            self.fail(node, where, f"must be between {lo} and {hi}")
            return None
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            self.fail(node, where, "must be true or false")
            return None
        return node.value.lower() in ("true", "yes", "on")

    def seq(self, node: yaml.Node, where: str, item: Callable[[yaml.Node, str], T | None]
            ) -> tuple[T, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, where, "must be a list")
            return ()
        out: list[T] = []
        for i, n in enumerate(node.value):
            v = item(n, f"{where}[{i}]")
            if v is not None:
                out.append(v)
        return tuple(out)

    def strings(self, node: yaml.Node, where: str, pattern: re.Pattern[str] | None = None,
                what: str = "") -> tuple[str, ...]:
        return self.seq(node, where, lambda n, w: self.string(n, w, pattern, what))

    def choice(self, node: yaml.Node, where: str, enum: type[StrEnum]) -> Any:
        value = self.string(node, where)
        if value is None:
            return None
        try:
            return enum(value)
        except ValueError:
            self.fail(node, where, f"{value!r} is not one of {', '.join(e.value for e in enum)}")
            return None


def _abs_path(c: _Checker, node: yaml.Node, where: str) -> str | None:
    value = c.string(node, where)
    if value is None:
        return None
    if not value.startswith("/") or ".." in value.split("/"):
        c.fail(node, where, f"{value!r} must be an absolute path without '..'")
        return None
    return value


def _repo(c: _Checker, node: yaml.Node, where: str, family: Family | None) -> Repo | None:
    common = {"name", "baseurl"}
    deb = {"suite", "components", "keyring", "trusted"}
    rpm = {"gpgkey", "gpgcheck", "sources"}
    allowed = common | (deb if family is Family.DEB else rpm if family is Family.RPM else deb | rpm)
    required = common | ({"suite", "components"} if family is Family.DEB else set())
    m = c.mapping(node, where, allowed, required)
    if m is None:
        return None
    name = c.string(m["name"], f"{where}.name", NAME_RE, "a valid repo name") if "name" in m else None
    baseurl = c.string(m["baseurl"], f"{where}.baseurl") if "baseurl" in m else None
    if baseurl is not None and not re.match(r"^(https?|file)://|^\$\{", baseurl):
        c.fail(m["baseurl"], f"{where}.baseurl", f"{baseurl!r} must be an http(s):// or file:// URL")
        baseurl = None
    suite = c.string(m["suite"], f"{where}.suite") if "suite" in m else None
    comps = c.strings(m["components"], f"{where}.components") if "components" in m else ()
    keyring = c.string(m["keyring"], f"{where}.keyring") if "keyring" in m else None
    trusted = c.boolean(m["trusted"], f"{where}.trusted") if "trusted" in m else False
    gpgcheck = c.boolean(m["gpgcheck"], f"{where}.gpgcheck") if "gpgcheck" in m else True
    sources = c.string(m["sources"], f"{where}.sources") if "sources" in m else None
    if sources is not None and not re.match(r"^(https?|file)://|^\$\{", sources):
        c.fail(m["sources"], f"{where}.sources", f"{sources!r} must be an http(s):// or file:// URL")
    gpgkey: tuple[str, ...] = ()
    if "gpgkey" in m:
        gk = m["gpgkey"]
        gpgkey = (c.strings(gk, f"{where}.gpgkey") if isinstance(gk, yaml.SequenceNode)
                  else tuple(x for x in [c.string(gk, f"{where}.gpgkey")] if x))
    if name is None or baseurl is None:
        return None
    if family is Family.DEB and not trusted and keyring is None:
        c.fail(node, where, "needs a keyring (or `trusted: true` to skip signature checks)")
    if family is Family.RPM and gpgcheck and not gpgkey:
        c.fail(node, where, "needs a gpgkey (or `gpgcheck: false` to skip signature checks)")
    return Repo(name=name, baseurl=baseurl, suite=suite, components=comps, keyring=keyring,
                trusted=bool(trusted), gpgkey=gpgkey, gpgcheck=bool(gpgcheck), sources=sources)


def _group(c: _Checker, node: yaml.Node, where: str) -> Group | None:
    m = c.mapping(node, where, {"name", "gid"}, {"name", "gid"})
    if m is None or "name" not in m or "gid" not in m:
        return None
    name = c.string(m["name"], f"{where}.name", USER_RE, "a valid group name")
    gid = c.integer(m["gid"], f"{where}.gid")
    return Group(name, gid) if name is not None and gid is not None else None


def _user(c: _Checker, node: yaml.Node, where: str) -> User | None:
    m = c.mapping(node, where, {"name", "uid", "gid", "home", "shell", "groups"}, {"name", "uid"})
    if m is None or "name" not in m or "uid" not in m:
        return None
    name = c.string(m["name"], f"{where}.name", USER_RE, "a valid user name")
    uid = c.integer(m["uid"], f"{where}.uid")
    gid = c.integer(m["gid"], f"{where}.gid") if "gid" in m else uid
    home = _abs_path(c, m["home"], f"{where}.home") if "home" in m else f"/home/{name}"
    shell = _abs_path(c, m["shell"], f"{where}.shell") if "shell" in m else "/bin/sh"
    groups = c.strings(m["groups"], f"{where}.groups", USER_RE, "a group name") if "groups" in m else ()
    if name is None or uid is None or gid is None or home is None or shell is None:
        return None
    return User(name=name, uid=uid, gid=gid, home=home, shell=shell, groups=groups)


def _file(c: _Checker, node: yaml.Node, where: str, base: Path) -> File | None:
    m = c.mapping(node, where, {"path", "content", "source", "mode", "owner", "group"}, {"path"})
    if m is None or "path" not in m:
        return None
    path = _abs_path(c, m["path"], f"{where}.path")
    content: bytes | None = None
    source: str | None = None
    if ("content" in m) == ("source" in m):
        c.fail(node, where, "needs exactly one of `content` or `source`")
    elif "content" in m:
        text = m["content"]
        if isinstance(text, yaml.ScalarNode) and text.tag == "tag:yaml.org,2002:str":
            content = str(text.value).encode()
        else:
            c.fail(text, f"{where}.content", "must be a string")
    else:
        src = source = c.string(m["source"], f"{where}.source")
        if src is not None and (src.startswith("/") or ".." in src.split("/")):
            c.fail(m["source"], f"{where}.source", "must be a path relative to the spec, without '..'")
        elif src is not None:
            try:
                content = (base / src).read_bytes()
            except OSError as e:
                c.fail(m["source"], f"{where}.source", f"cannot read {base / src}: {e.strerror}")
    mode = 0o644
    if "mode" in m:
        raw = m["mode"]
        text_mode = raw.value if isinstance(raw, yaml.ScalarNode) else None
        if not isinstance(text_mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", text_mode):
            c.fail(raw, f"{where}.mode", "must be an octal mode in quotes, like \"0644\"")
        else:
            mode = int(text_mode, 8)
    owner = c.integer(m["owner"], f"{where}.owner") if "owner" in m else 0
    group = c.integer(m["group"], f"{where}.group") if "group" in m else 0
    if path is None or content is None or owner is None or group is None:
        return None
    return File(path=path, content=content, mode=mode, owner=owner, group=group, source=source)


SPEC_FIELDS = {"name", "family", "arch", "repos", "packages", "variant", "releasever", "users",
               "groups", "files", "exclude", "forbidden", "compression", "outputs", "vm", "guest",
               "allow"}

DEFAULT_VM_PACKAGES = ("linux-image-amd64", "systemd-sysv", "openssh-server", "sudo", "ifupdown",
                       "isc-dhcp-client", "python3", "python3-yaml", "mmdebstrap", "zstd")


RPM_BUILDER_PACKAGES = ("dnf", "rpm")


def _vm(c: _Checker, node: yaml.Node, family: Family | None) -> Vm | None:
    m = c.mapping(node, "vm", {"packages", "disk_mib", "user", "memory_mib", "repos"}, set())
    if m is None:
        return None
    default = DEFAULT_VM_PACKAGES + (RPM_BUILDER_PACKAGES if family is Family.RPM else ())
    packages = c.strings(m["packages"], "vm.packages", PKG_RE, "a package name") \
        if "packages" in m else default
    repos: tuple[Repo, ...] = ()
    if "repos" in m:
        if family is not Family.RPM:
            c.fail(m["repos"], "vm.repos", "only rpm environments name their builder's (Debian) repos")
        else:
            repos = c.seq(m["repos"], "vm.repos", lambda n, w: _repo(c, n, w, Family.DEB))
    disk = c.integer(m["disk_mib"], "vm.disk_mib", 1024, 1 << 20) if "disk_mib" in m else 8192
    memory = c.integer(m["memory_mib"], "vm.memory_mib", 256, 1 << 20) if "memory_mib" in m else 2048
    user = c.string(m["user"], "vm.user", USER_RE, "a user name") if "user" in m else "builder"
    if disk is None or memory is None or user is None:
        return None
    return Vm(packages=packages, disk_mib=disk, user=user, memory_mib=memory, repos=repos)


def _allow(c: _Checker, node: yaml.Node, where: str) -> Allow | None:
    m = c.mapping(node, where, {"path", "reason", "rule"}, {"path", "reason"})
    if m is None:
        return None
    path = _abs_path(c, m["path"], f"{where}.path") if "path" in m else None
    reason = c.string(m["reason"], f"{where}.reason") if "reason" in m else None
    rule = c.string(m["rule"], f"{where}.rule", NAME_RE, "a rule name") if "rule" in m else None
    if reason is not None and not reason.strip():
        c.fail(m["reason"], f"{where}.reason", "must say why the path may be published")
        return None
    if path is None or not reason:
        return None
    return Allow(path=path, reason=reason, rule=rule)


def _plain(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _guest(c: _Checker, node: yaml.Node) -> Guest | None:
    m = c.mapping(node, "guest", {"roles", "vars"}, set())
    if m is None:
        return None
    roles = c.strings(m["roles"], "guest.roles", NAME_RE, "a role name") if "roles" in m else ()
    variables: tuple[tuple[str, Any], ...] = ()
    if "vars" in m:
        if not isinstance(m["vars"], yaml.MappingNode):
            c.fail(m["vars"], "guest.vars", "must be a mapping of role variables")
        else:
            variables = tuple(sorted(_plain(m["vars"]).items()))
    return Guest(roles=roles, vars=variables)


def load_spec(path: Path) -> Spec:
    """Parse and validate a spec file. Raises SpecError with one line per problem."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError([f"{path}: cannot read spec: {e.strerror}"]) from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"{path}:{line}: not valid YAML: {problem}"]) from None
    c = _Checker(path)
    if root is None:
        raise SpecError([f"{path}:1: the spec is empty"])
    m = c.mapping(root, "", SPEC_FIELDS, {"name", "family", "arch", "repos", "packages"})
    if m is None:
        raise SpecError(c.problems)
    name = c.string(m["name"], "name", NAME_RE, "a valid name (lowercase letters, digits, . _ -)") \
        if "name" in m else None
    family: Family | None = c.choice(m["family"], "family", Family) if "family" in m else None
    arch = c.string(m["arch"], "arch", re.compile(r"^[a-z0-9_]+$"), "an architecture") \
        if "arch" in m else None
    repos = c.seq(m["repos"], "repos", lambda n, w: _repo(c, n, w, family)) if "repos" in m else ()
    if "repos" in m and isinstance(m["repos"], yaml.SequenceNode) and not m["repos"].value:
        c.fail(m["repos"], "repos", "needs at least one repo")
    names = [r.name for r in repos]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        c.fail(m["repos"], "repos", f"repo name {dup!r} is used twice")
    packages = c.strings(m["packages"], "packages", PKG_RE, "a package name") if "packages" in m else ()
    variant = Variant.ESSENTIAL
    if "variant" in m:
        if family is Family.RPM:
            c.fail(m["variant"], "variant", "only deb environments have a variant")
        else:
            variant = c.choice(m["variant"], "variant", Variant) or Variant.ESSENTIAL
    releasever = None
    if "releasever" in m:
        rv = m["releasever"]
        if isinstance(rv, yaml.ScalarNode) and rv.value:
            releasever = str(rv.value)
        else:
            c.fail(rv, "releasever", "must be a string like \"6\"")
    groups = c.seq(m["groups"], "groups", lambda n, w: _group(c, n, w)) if "groups" in m else ()
    users = c.seq(m["users"], "users", lambda n, w: _user(c, n, w)) if "users" in m else ()
    files = c.seq(m["files"], "files", lambda n, w: _file(c, n, w, path.parent)) if "files" in m else ()
    exclude = c.seq(m["exclude"], "exclude", lambda n, w: _abs_path(c, n, w)) if "exclude" in m else ()
    forbidden = c.strings(m["forbidden"], "forbidden") if "forbidden" in m else ()
    compression = "zstd"
    if "compression" in m:
        comp = c.string(m["compression"], "compression", re.compile(r"^(zstd|xz)$"), "zstd or xz")
        compression = comp or "zstd"
    outputs: tuple[Output, ...] = (Output.CHROOT,)
    if "outputs" in m:
        outs = c.seq(m["outputs"], "outputs", lambda n, w: c.choice(n, w, Output))
        outputs = tuple(dict.fromkeys((Output.CHROOT, *outs)))
    vm = _vm(c, m["vm"], family) if "vm" in m else None
    guest = _guest(c, m["guest"]) if "guest" in m else Guest()
    allow = c.seq(m["allow"], "allow", lambda n, w: _allow(c, n, w)) if "allow" in m else ()
    wants_vm = any(o is not Output.CHROOT for o in outputs)
    if wants_vm and family is Family.RPM and (vm is None or not vm.repos):
        c.fail(m.get("vm", m["outputs"]), "vm.repos", "an rpm environment's builder is a Debian "
               "machine: name its Debian repos in vm.repos")
    if wants_vm and vm is None:
        vm = Vm(packages=DEFAULT_VM_PACKAGES)
    if c.problems or name is None or family is None or arch is None:
        raise SpecError(c.problems or [f"{path}:1: invalid spec"])
    warnings = tuple(
        f"{path}: repo {r.name!r} opts out of signature checks "
        f"({'gpgcheck: false' if family is Family.RPM else 'trusted: true'})"
        for r in repos if not r.verified(family)
    )
    return Spec(path=path, name=name, family=family, arch=arch, repos=repos, packages=packages,
                variant=variant, releasever=releasever, users=users, groups=groups, files=files,
                exclude=exclude, forbidden=forbidden, compression=compression, outputs=outputs,
                vm=vm, guest=guest or Guest(), allow=allow, warnings=warnings)


# --------------------------------------------------------------------------- variables

def host_debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The Debian archive URL apt on this machine is configured with (not the security one)."""
    candidates: list[tuple[str, list[str]]] = []
    for f in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in f.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        if suites and not any(s.endswith("-security") for s in suites) and "security" not in uri:
            return uri.rstrip("/")
    return None


def expand(value: str, where: str, env: Mapping[str, str] | None = None) -> str:
    """Expand ${VAR} from the environment; ${HOST_DEBIAN_MIRROR} defaults to the host's apt mirror."""
    env = dict(os.environ if env is None else env)
    if "HOST_DEBIAN_MIRROR" not in env:
        mirror = host_debian_mirror()
        if mirror:
            env["HOST_DEBIAN_MIRROR"] = mirror

    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        if var not in env:
            raise SpecError([f"{where}: ${{{var}}} is not set"])
        return env[var]

    return VAR_RE.sub(sub, value)


# --------------------------------------------------------------------------- the spec as a blob

def spec_bundle(spec: Spec) -> bytes:
    """The spec file and the files it reads, as one JSON document: published with each version
    so that `provision verify --rebuild` can build it again from the store alone."""
    files = {spec.path.name: base64.b64encode(spec.path.read_bytes()).decode()}
    for rel in spec.sources:
        files[rel] = base64.b64encode((spec.path.parent / rel).read_bytes()).decode()
    return (json.dumps({"spec": spec.path.name, "files": files}, indent=1, sort_keys=True)
            + "\n").encode()


def unpack_spec_bundle(data: bytes, dest: Path) -> Path:
    """Write a spec bundle's files under `dest`; returns the spec's path."""
    try:
        doc = json.loads(data)
        name = str(doc["spec"])
        files = {str(k): base64.b64decode(v, validate=True) for k, v in doc["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SpecError([f"stored spec: not a valid spec bundle ({e!r})"]) from None
    for rel, content in files.items():
        target = (dest / rel).resolve()
        if rel.startswith("/") or ".." in Path(rel).parts or not target.is_relative_to(dest.resolve()):
            raise SpecError([f"stored spec: refusing file path {rel!r}"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    if name not in files:
        raise SpecError([f"stored spec: the bundle lacks its spec {name!r}"])
    return dest / name
