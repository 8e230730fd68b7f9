"""Stage 2: spec -> lock. Freezes the exact package set (with URLs, sizes and sha256) of an
environment, including what the bootstrap itself installs, so it can be rebuilt years later.

Resolving twice against the same mirror state writes the same bytes: nothing in a lock comes
from the clock; its source_date_epoch comes from the mirror (deb: the newest Release date;
rpm: the newest package build time).
"""

from __future__ import annotations

import email.utils
import fnmatch
import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from provision import run
from provision.download import fetch_bytes, probe
from provision.errors import CommandFailed, LockError, MirrorUnreachable
from provision.fsutil import write_atomic
from provision.spec import Family, Spec, Variant, expand

LOCK_VERSION = 1
DNF_PYTHON = os.environ.get("PROVISION_DNF_PYTHON", "/usr/bin/python3")


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str  # deb: the full Debian version (epoch:upstream-revision); rpm: VERSION
    arch: str
    path: str  # relative to its repo's baseurl
    size: int
    sha256: str
    source: str
    repo: str
    epoch: int | None = None  # rpm only
    release: str | None = None  # rpm only

    @property
    def evr(self) -> str:
        if self.release is None:
            return self.version
        epoch = f"{self.epoch}:" if self.epoch else ""
        return f"{epoch}{self.version}-{self.release}"

    @property
    def filename(self) -> str:
        """A canonical file name for the package in a local repository."""
        if self.release is None:
            version = self.version.split(":", 1)[-1]
            return f"{self.name}_{version}_{self.arch}.deb"
        return f"{self.name}-{self.version}-{self.release}.{self.arch}.rpm"

    def line(self) -> str:
        return f"{self.name} {self.evr} {self.arch}"


@dataclass(frozen=True)
class LockedKey:
    repo: str
    url: str  # as the spec wrote it: ${VAR} is expanded when it is fetched
    sha256: str


@dataclass(frozen=True)
class LockedRepo:
    name: str
    baseurl: str  # as the spec wrote it: the lock names no mirror host of its own


def join_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


@dataclass(frozen=True)
class Lock:
    name: str
    family: Family
    arch: str
    spec_digest: str
    source_date_epoch: int
    packages: tuple[LockedPackage, ...]
    repos: tuple[LockedRepo, ...]
    keys: tuple[LockedKey, ...] = ()
    suite: str | None = None
    vm_packages: tuple[LockedPackage, ...] = ()  # the builder machine's root (always deb)
    vm_suite: str | None = None
    vm_arch: str | None = None

    def urls(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """Each repo's base URL, with ${VAR} expanded now (on this machine)."""
        return {r.name: expand(r.baseurl, f"lock {self.name}: repo {r.name}", env)
                for r in self.repos}

    def package_url(self, p: LockedPackage, urls: dict[str, str]) -> str:
        return join_url(urls[p.repo], p.path)

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "lock_version": LOCK_VERSION,
            "name": self.name,
            "family": self.family.value,
            "arch": self.arch,
            "suite": self.suite,
            "spec_digest": self.spec_digest,
            "source_date_epoch": self.source_date_epoch,
            "keys": [asdict(k) for k in self.keys],
            "repos": [asdict(r) for r in self.repos],
            "packages": [
                {k: v for k, v in asdict(p).items() if v is not None} for p in self.packages
            ],
        }
        if self.vm_packages:
            data["vm_suite"] = self.vm_suite
            data["vm_arch"] = self.vm_arch
            data["vm_packages"] = [
                {k: v for k, v in asdict(p).items() if v is not None} for p in self.vm_packages
            ]
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    def matches(self, spec: Spec) -> bool:
        return self.spec_digest == spec.digest()


def read_lock(path: Path) -> Lock:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LockError(f"{path}: no lock file (run `provision lock` first)") from None
    except (OSError, ValueError) as e:
        raise LockError(f"{path}: not a readable lock file ({e})") from None
    try:
        if data["lock_version"] != LOCK_VERSION:
            raise LockError(f"{path}: lock version {data['lock_version']} is not supported")
        return Lock(
            name=data["name"],
            family=Family(data["family"]),
            arch=data["arch"],
            suite=data.get("suite"),
            spec_digest=data["spec_digest"],
            source_date_epoch=int(data["source_date_epoch"]),
            keys=tuple(LockedKey(**k) for k in data["keys"]),
            repos=tuple(LockedRepo(**r) for r in data["repos"]),
            packages=tuple(LockedPackage(**p) for p in data["packages"]),
            vm_packages=tuple(LockedPackage(**p) for p in data.get("vm_packages", [])),
            vm_suite=data.get("vm_suite"),
            vm_arch=data.get("vm_arch"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LockError(f"{path}: malformed lock file ({e!r}); make it again with --relock") from None


def write_lock(lock: Lock, path: Path) -> None:
    """Write atomically: a reader sees the old lock or the new one, never half of one."""
    try:
        write_atomic(path, lock.to_json())
    except OSError as e:
        raise LockError(f"cannot write {path}: {e.strerror}") from None


def check_forbidden(spec: Spec, names: list[str]) -> None:
    hits = sorted({f"{n} (matches {g!r})" for n in names for g in spec.forbidden
                   if fnmatch.fnmatchcase(n, g)})
    if hits:
        raise LockError(f"{spec.name}: forbidden packages would be included: {', '.join(hits)}")


def resolve(spec: Spec, env: dict[str, str] | None = None) -> Lock:
    """Resolve the spec's full package set against its mirrors."""
    urls = [expand(r.baseurl, f"{spec.path}: repos.{r.name}.baseurl", env) for r in spec.repos]
    with tempfile.TemporaryDirectory(prefix="provision-lock-") as tmp:
        if spec.family is Family.DEB:
            lock = _resolve_deb(spec, urls, Path(tmp))
        else:
            lock = _resolve_rpm(spec, urls, Path(tmp))
            if spec.vm is not None and spec.vm.repos:
                lock = _with_rpm_builder(spec, lock, Path(tmp) / "builder", env)
    check_forbidden(spec, [p.name for p in lock.packages])
    return lock


# --------------------------------------------------------------------------- deb

APT_CONF = """\
Dir "{root}/";
Dir::State::status "{root}/var/lib/dpkg/status";
Dir::Etc::Parts "{root}/etc/apt/apt.conf.d";
APT::Architecture "{arch}";
APT::Architectures "{arch}";
Acquire::Languages "none";
Acquire::Retries "2";
APT::Sandbox::User "root";
Debug::NoLocking "true";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
"""

VARIANT_EXTRA = {
    Variant.ESSENTIAL: [],
    Variant.APT: ["apt"],
    Variant.REQUIRED: ["apt", "?priority(required)"],
    Variant.BUILDD: ["apt", "?priority(required)", "build-essential"],
    Variant.IMPORTANT: ["apt", "?priority(required)", "?priority(important)"],
}


def apt_env(root: Path, arch: str) -> dict[str, str]:
    """A private apt configuration under `root`: nothing of the host's apt state is used."""
    for d in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/trusted.gpg.d",
              "etc/apt/sources.list.d", "var/lib/apt/lists/partial",
              "var/cache/apt/archives/partial", "var/lib/dpkg"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    conf = root / "apt.conf"
    conf.write_text(APT_CONF.format(root=root, arch=arch))
    return {"APT_CONFIG": str(conf), "LC_ALL": "C.UTF-8"}


def deb_sources(spec: Spec, urls: list[str]) -> str:
    lines = []
    for repo, url in zip(spec.repos, urls, strict=True):
        opts = f"arch={spec.arch}"
        opts += " trusted=yes" if repo.trusted else f" signed-by={repo.keyring}"
        lines.append(f"deb [{opts}] {url} {repo.suite} {' '.join(repo.components)}")
    return "\n".join(lines) + "\n"


def parse_deb822(text: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def _resolve_deb(spec: Spec, urls: list[str], tmp: Path) -> Lock:
    for repo, url in zip(spec.repos, urls, strict=True):
        if repo.keyring and not Path(repo.keyring).is_file():
            raise LockError(f"{spec.path}: repo {repo.name}: keyring {repo.keyring} does not exist")
        probe(f"{url}/dists/{repo.suite}/Release")
    env = apt_env(tmp, spec.arch)
    (tmp / "etc/apt/sources.list").write_text(deb_sources(spec, urls))
    try:
        run.run(["apt-get", "update", "-q"], capture=True, extra_env=env)
    except CommandFailed as e:
        text = e.stderr
        if "NO_PUBKEY" in text or "not signed" in text or "EXPKEYSIG" in text:
            raise LockError(f"{spec.name}: repository signature check failed: "
                            f"{_first_error(text)}") from None
        raise MirrorUnreachable(f"mirror unreachable: {_first_error(text)}") from None
    # Map the lists apt fetched back to the repo they came from.
    lists = tmp / "var/lib/apt/lists"
    index: dict[tuple[str, str, str], tuple[dict[str, str], str, str]] = {}
    dates: list[int] = []
    for repo, url in zip(spec.repos, urls, strict=True):
        prefix = _list_prefix(url)
        for rel in sorted(lists.glob(f"{prefix}_dists_{_quote(repo.suite or '')}_*Release")):
            fields = parse_deb822(rel.read_text(errors="replace").split("-----BEGIN PGP SIGNATURE")[0])
            for f in fields:
                if "Date" in f:
                    parsed = email.utils.parsedate_to_datetime(f["Date"])
                    dates.append(int(parsed.timestamp()))
        for packages_file in sorted(lists.glob(f"{prefix}_dists_*_Packages")):
            for st in parse_deb822(packages_file.read_text(errors="replace")):
                k = (st.get("Package", ""), st.get("Version", ""), st.get("Architecture", ""))
                index.setdefault(k, (st, url, repo.name))
    if not dates:
        raise LockError(f"{spec.name}: the repositories' Release files carry no Date")
    wanted = ["?essential", *VARIANT_EXTRA[spec.variant], *spec.packages]

    def apt_resolve(names: list[str]) -> tuple[LockedPackage, ...]:
        try:
            out = run.output(["apt-get", "install", "-s", "-q", *names], extra_env=env)
        except CommandFailed as e:
            raise LockError(f"{spec.name}: cannot resolve packages: {_first_error(e.stderr)}") from None
        pkgs: list[LockedPackage] = []
        for m in re.finditer(r"^Inst (\S+) (?:\[[^]]*\] )?\((\S+) .*\[(\S+)\]\)", out, re.M):
            name, version, arch = m.groups()
            found = index.get((name, version, arch))
            if found is None:
                raise LockError(f"{spec.name}: {name} {version} {arch} is not in the fetched indexes")
            st, _url, repo_name = found
            if "SHA256" not in st:
                raise LockError(f"{spec.name}: {name} {version} has no SHA256 in the mirror's index")
            source = st.get("Source", name).split(" ")[0]
            pkgs.append(LockedPackage(
                name=name, version=version, arch=arch, path=st["Filename"],
                size=int(st["Size"]), sha256=st["SHA256"], source=source, repo=repo_name))
        if not pkgs:
            raise LockError(f"{spec.name}: apt resolved no packages")
        return tuple(sorted(pkgs, key=lambda p: (p.name, p.arch)))

    pkgs = apt_resolve(wanted)
    # The builder machine: the same resolution plus what boots (resolved together, so the
    # environment's packages keep their versions).
    vm_pkgs = apt_resolve([*wanted, *spec.vm.packages]) if spec.vm else ()
    return Lock(name=spec.name, family=spec.family, arch=spec.arch, spec_digest=spec.digest(),
                source_date_epoch=max(dates), packages=pkgs, repos=_locked_repos(spec),
                suite=spec.repos[0].suite, vm_packages=vm_pkgs,
                vm_suite=spec.repos[0].suite if vm_pkgs else None,
                vm_arch=spec.arch if vm_pkgs else None)


def _quote(s: str) -> str:
    return s.replace("/", "_")


def _list_prefix(url: str) -> str:
    """apt's lists/ file name prefix for a URL (scheme dropped, / -> _)."""
    parts = urllib.parse.urlsplit(url)
    path = (parts.netloc + parts.path).rstrip("/")
    return glob_escape(path.replace("/", "_"))


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if line.startswith(("E:", "Err:", "W:")) or "rror" in line:
            return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no detail"


# --------------------------------------------------------------------------- rpm

def _resolve_rpm(spec: Spec, urls: list[str], tmp: Path) -> Lock:
    keys: list[LockedKey] = []
    for repo, url in zip(spec.repos, urls, strict=True):
        probe(urllib.parse.urljoin(url.rstrip("/") + "/", "repodata/repomd.xml"))
        for key_url in repo.gpgkey:
            data = fetch_bytes(expand(key_url, f"{spec.path}: repos.{repo.name}.gpgkey"))
            if b"BEGIN PGP PUBLIC KEY BLOCK" not in data:
                raise LockError(f"{spec.name}: {key_url} is not an armoured PGP public key")
            keys.append(LockedKey(repo=repo.name, url=key_url,
                                  sha256=hashlib.sha256(data).hexdigest()))
    request = {
        "installroot": str(tmp / "root"),
        "cachedir": str(tmp / "cache"),
        "arch": spec.arch,
        "releasever": spec.releasever,
        "repos": [{"name": r.name, "baseurl": u} for r, u in zip(spec.repos, urls, strict=True)],
        "packages": list(spec.packages),
    }
    helper = Path(__file__).parent / "helpers" / "dnf_resolve.py"
    proc = run.run([DNF_PYTHON, helper], capture=True, check=False,
                   input=json.dumps(request).encode())
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode == 3:
        raise MirrorUnreachable(err.splitlines()[-1] if err else "mirror unreachable")
    if proc.returncode != 0:
        last = err.splitlines()[-1] if err else f"exit {proc.returncode}"
        if "No module named 'dnf'" in err:
            last = f"{DNF_PYTHON} has no dnf module (run scripts/setup)"
        raise LockError(f"{spec.name}: {last}")
    answer = json.loads(proc.stdout)
    by_repo = {r.name: u for r, u in zip(spec.repos, urls, strict=True)}
    pkgs: list[LockedPackage] = []
    for p in answer["packages"]:
        if p["checksum_type"] == "sha256":
            sha = p["checksum"]
        else:
            sha = _sha256_of(join_url(by_repo[p["repo"]], p["location"]))
        source = re.sub(r"-[^-]+-[^-]+\.src\.rpm$", "", p["sourcerpm"]) or p["name"]
        pkgs.append(LockedPackage(
            name=p["name"], version=p["version"], arch=p["arch"], path=p["location"],
            size=int(p["size"]),
            sha256=sha, source=source, repo=p["repo"], epoch=int(p["epoch"]),
            release=p["release"]))
    if not pkgs:
        raise LockError(f"{spec.name}: dnf resolved no packages")
    epoch = max(int(p["buildtime"]) for p in answer["packages"])
    return Lock(name=spec.name, family=spec.family, arch=spec.arch, spec_digest=spec.digest(),
                source_date_epoch=epoch, packages=tuple(pkgs), keys=tuple(keys),
                repos=_locked_repos(spec))


DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386"}


def _with_rpm_builder(spec: Spec, lock: Lock, tmp: Path, env: dict[str, str] | None) -> Lock:
    """An rpm environment's Debian builder: its package set, resolved from spec.vm.repos."""
    assert spec.vm is not None
    names = {r.name for r in spec.repos} & {r.name for r in spec.vm.repos}
    if names:
        raise LockError(f"{spec.path}: vm.repos reuse repo names of repos: {', '.join(sorted(names))}")
    builder = replace(spec, family=Family.DEB, arch=DEB_ARCH.get(spec.arch, spec.arch),
                      repos=spec.vm.repos, packages=spec.vm.packages, variant=Variant.APT,
                      vm=None, forbidden=())
    urls = [expand(r.baseurl, f"{spec.path}: vm.repos.{r.name}.baseurl", env) for r in builder.repos]
    tmp.mkdir()
    deb = _resolve_deb(builder, urls, tmp)
    return replace(lock, repos=lock.repos + deb.repos, vm_packages=deb.packages,
                   vm_suite=deb.suite, vm_arch=builder.arch)


def _locked_repos(spec: Spec) -> tuple[LockedRepo, ...]:
    return tuple(LockedRepo(name=r.name, baseurl=r.baseurl) for r in spec.repos)


def _sha256_of(url: str) -> str:
    """For mirrors whose metadata carries only an older checksum type."""
    h = hashlib.sha256()
    from provision.download import open_url  # local: only old mirrors need it

    with open_url(url) as (f, _):
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def lock_spec(spec: Spec, *, write: bool = True) -> Lock:
    """Resolve and write `<spec>.lock` beside the spec."""
    for w in spec.warnings:
        print(f"provision: warning: {w}", file=sys.stderr)
    lock = resolve(spec)
    if write:
        write_lock(lock, spec.lock_path)
    return lock
