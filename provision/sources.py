"""The source bundle: the source packages of every locked package, served from the store that
serves the binary chroot ("from the same place", as copyleft licenses ask).

deb: the suite's `Sources` indexes, fetched and verified by apt (InRelease signature, then
hashes) in a private configuration; each source package's `.dsc` and the files it names are
downloaded and checked against the index's SHA-256 and size.
rpm: the SRPM repository a repo names in `sources:`; SRPMs are checked against the repository
metadata's SHA-256, and their signatures against the locked keys when the repo checks them.

Every file becomes a content-addressed blob; a manifest (source -> files -> digests, and what is
missing) is a blob too, named in the index as the version's `sources` artifact.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import sys
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from provision import run
from provision.cache import PackageCache
from provision.download import NotFound, download, fetch_bytes
from provision.errors import CommandFailed, MirrorUnreachable, ProvisionError
from provision.fsutil import file_digest
from provision.index import Ref
from provision.lock import Lock, LockedPackage, apt_env, join_url, parse_deb822
from provision.progress import Progress
from provision.spec import Family, Spec, expand
from provision.store import Store

PARALLEL = 4
# Licenses whose terms oblige a distributor to offer the corresponding source.
COPYLEFT_RE = re.compile(r"\b(A?GPL|LGPL|MPL|EPL|CDDL|EUPL|OSL|CPL|Sleepycat|SISSL|QPL)", re.I)


class SourcesError(ProvisionError):
    """Source packages cannot be gathered, or copyleft sources are missing."""


@dataclass(frozen=True)
class SourceFile:
    name: str
    sha256: str
    size: int
    url: str

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256


@dataclass(frozen=True)
class SourcePackage:
    name: str
    version: str
    binaries: tuple[str, ...]
    files: tuple[SourceFile, ...]


@dataclass(frozen=True)
class Missing:
    name: str
    version: str
    binaries: tuple[str, ...]
    license: str
    copyleft: bool
    reason: str


@dataclass(frozen=True)
class Bundle:
    environment: str
    digest: str
    sources: tuple[SourcePackage, ...]
    missing: tuple[Missing, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for s in self.sources for f in s.files)

    def files(self) -> list[SourceFile]:
        return [f for s in self.sources for f in s.files]

    def manifest(self) -> bytes:
        doc = {
            "environment": self.environment,
            "digest": self.digest,
            "sources": [{"name": s.name, "version": s.version, "binaries": list(s.binaries),
                         "files": [{"name": f.name, "digest": f.digest, "size": f.size}
                                   for f in s.files]}
                        for s in self.sources],
            "missing": [{"name": m.name, "version": m.version, "binaries": list(m.binaries),
                         "license": m.license, "copyleft": m.copyleft, "reason": m.reason}
                        for m in self.missing],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def manifest_digests(data: bytes) -> list[str]:
    """The blob digests a sources manifest refers to."""
    try:
        doc = json.loads(data)
        return [str(f["digest"]) for s in doc["sources"] for f in s["files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SourcesError(f"not a valid sources manifest ({e!r})") from None


def licenses_from_sbom(data: bytes | None) -> dict[str, str]:
    """Package name -> declared license, from the version's SPDX SBOM (if any)."""
    if not data:
        return {}
    try:
        doc = json.loads(data)
        return {str(p["name"]): str(p.get("licenseDeclared", "NOASSERTION"))
                for p in doc.get("packages", []) if "name" in p}
    except (ValueError, TypeError, AttributeError):
        return {}


def is_copyleft(license_text: str) -> bool:
    """Copyleft, or unknown (NOASSERTION): we cannot tell, so we must assume it is."""
    return bool(COPYLEFT_RE.search(license_text)) or license_text in ("", "NOASSERTION")


def _groups(packages: Iterable[LockedPackage]) -> dict[tuple[str, str], list[LockedPackage]]:
    """Locked binaries grouped by (source name, binary version without a binNMU suffix)."""
    out: dict[tuple[str, str], list[LockedPackage]] = {}
    for p in packages:
        out.setdefault((p.source or p.name, _strip_binnmu(p.evr)), []).append(p)
    return out


# --------------------------------------------------------------------------- deb

def _strip_binnmu(version: str) -> str:
    return re.sub(r"\+b\d+$", "", version)


def _deb_candidates(spec: Spec, work: Path) -> dict[str, list[tuple[dict[str, str], str]]]:
    """Source name -> [(Sources stanza, mirror base URL)], via apt's verified deb-src indexes."""
    env = apt_env(work, spec.arch)
    lines = []
    urls = []
    for repo in spec.repos:
        url = expand(repo.baseurl, f"{spec.path}: repos.{repo.name}.baseurl")
        urls.append(url)
        opts = "trusted=yes" if repo.trusted else f"signed-by={repo.keyring}"
        lines.append(f"deb-src [{opts}] {url} {repo.suite} {' '.join(repo.components)}")
    (work / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
    try:
        run.run(["apt-get", "update", "-q"], capture=True, extra_env=env)
    except CommandFailed as e:
        raise MirrorUnreachable(f"cannot fetch the source indexes: "
                                f"{e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}"
                                ) from None
    out: dict[str, list[tuple[dict[str, str], str]]] = {}
    lists = work / "var/lib/apt/lists"
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        prefix = (parts.netloc + parts.path).rstrip("/").replace("/", "_")
        for f in sorted(lists.glob(f"{prefix}_dists_*_source_Sources")):
            for st in parse_deb822(f.read_text(errors="replace")):
                if "Package" in st:
                    out.setdefault(st["Package"], []).append((st, url))
    if not out:
        raise SourcesError(f"{spec.name}: the mirror has no source indexes (deb-src) for "
                           f"{', '.join(r.suite or '' for r in spec.repos)}")
    return out


def _deb_sources(spec: Spec, lock: Lock, work: Path
                 ) -> tuple[list[SourcePackage], list[tuple[str, str, tuple[str, ...], str]]]:
    index = _deb_candidates(spec, work)
    found: list[SourcePackage] = []
    missing: list[tuple[str, str, tuple[str, ...], str]] = []
    for (src, version), bins in sorted(_groups(lock.packages).items()):
        names = tuple(sorted(p.name for p in bins))
        # A binary's version can differ from its source's: a binNMU (+bN) or an epoch of its
        # own (bsdutils 1:2.38.1-5 from util-linux 2.38.1-5).
        versions = {version, *(p.version for p in bins)}
        wanted = versions | {re.sub(r"^\d+:", "", v) for v in versions}
        match = None
        for st, url in index.get(src, []):
            if st.get("Version") in wanted:
                match = (st, url)
                break
        if match is None:
            have = sorted({st.get("Version", "?") for st, _ in index.get(src, [])})
            reason = (f"the mirror has {src} {', '.join(have)}, not {version}" if have
                      else f"the mirror has no source package {src}")
            missing.append((src, version, names, reason))
            continue
        st, url = match
        files = []
        for line in st.get("Checksums-Sha256", "").splitlines():
            parts = line.split()
            if len(parts) == 3:
                sha, size, fname = parts
                files.append(SourceFile(fname, sha, int(size),
                                        join_url(url, f"{st['Directory']}/{fname}")))
        if not any(f.name.endswith(".dsc") for f in files):
            missing.append((src, version, names, "its Sources entry lists no .dsc"))
            continue
        found.append(SourcePackage(src, st["Version"], names, tuple(files)))
    return found, missing


# --------------------------------------------------------------------------- rpm

def _decompress(data: bytes, href: str) -> bytes:
    if href.endswith(".gz"):
        return gzip.decompress(data)
    if href.endswith(".xz"):
        return lzma.decompress(data)
    if href.endswith(".bz2"):
        return bz2.decompress(data)
    if href.endswith(".zst"):
        return run.run(["zstd", "-dc"], capture=True, input=data).stdout
    return data


NS = {"repo": "http://linux.duke.edu/metadata/repo", "c": "http://linux.duke.edu/metadata/common"}


def _srpm_index(base: str) -> dict[tuple[str, str], SourceFile]:
    """(name, evr) -> the SRPM, from a yum repository's primary metadata."""
    repomd = ET.fromstring(fetch_bytes(join_url(base, "repodata/repomd.xml")))  # noqa: S314
    href = None
    for d in repomd.findall("repo:data", NS):
        if d.get("type") == "primary":
            loc = d.find("repo:location", NS)
            href = loc.get("href") if loc is not None else None
    if href is None:
        raise SourcesError(f"{base}: repomd.xml names no primary metadata")
    primary = ET.fromstring(_decompress(fetch_bytes(join_url(base, href)), href))  # noqa: S314
    out: dict[tuple[str, str], SourceFile] = {}
    for p in primary.findall("c:package", NS):
        if p.findtext("c:arch", namespaces=NS) != "src":
            continue
        v = p.find("c:version", NS)
        cs = p.find("c:checksum", NS)
        loc = p.find("c:location", NS)
        size = p.find("c:size", NS)
        if v is None or cs is None or loc is None or size is None or cs.get("type") != "sha256":
            continue
        epoch = v.get("epoch", "0")
        evr = (f"{epoch}:" if epoch not in ("0", "") else "") + f"{v.get('ver')}-{v.get('rel')}"
        href = loc.get("href", "")
        out[(p.findtext("c:name", namespaces=NS) or "", evr)] = SourceFile(
            Path(href).name, cs.text or "", int(size.get("package", "0")), join_url(base, href))
    return out


def _rpm_sources(spec: Spec, lock: Lock
                 ) -> tuple[list[SourcePackage], list[tuple[str, str, tuple[str, ...], str]]]:
    repos = {r.name: r for r in spec.repos}
    indexes: dict[str, dict[tuple[str, str], SourceFile]] = {}
    found: list[SourcePackage] = []
    missing: list[tuple[str, str, tuple[str, ...], str]] = []
    for (src, evr), bins in sorted(_groups(lock.packages).items()):
        names = tuple(sorted(p.name for p in bins))
        repo = repos.get(bins[0].repo)
        if repo is None or repo.sources is None:
            missing.append((src, evr, names, f"repo {bins[0].repo} names no `sources:` URL"))
            continue
        if repo.name not in indexes:
            indexes[repo.name] = _srpm_index(
                expand(repo.sources, f"{spec.path}: repos.{repo.name}.sources"))
        f = indexes[repo.name].get((src, evr))
        if f is None:
            missing.append((src, evr, names, f"{repo.sources} has no {src}-{evr}.src.rpm"))
            continue
        found.append(SourcePackage(src, evr, names, (f,)))
    return found, missing


def _check_srpm_signatures(spec: Spec, lock: Lock, cache: PackageCache,
                           pkgs: list[SourcePackage], work: Path) -> None:
    checked = {r.name for r in spec.repos if r.gpgcheck}
    keyed = [k for k in lock.keys if k.repo in checked]
    if not keyed:
        return
    root = work / "rpmkeys"
    root.mkdir(parents=True, exist_ok=True)
    for k in keyed:
        run.run(["rpmkeys", "--root", str(root), "--import", str(cache.ensure_key(k))],
                capture=True)
    for s in pkgs:
        for f in s.files:
            try:
                run.run(["rpmkeys", "--root", str(root), "--checksig", str(cache.path(f.sha256))],
                        capture=True)
            except CommandFailed as e:
                raise SourcesError(f"{f.name}: signature check failed: "
                                   f"{e.stderr.strip() or e}") from None


# --------------------------------------------------------------------------- gather

def gather(spec: Spec, lock: Lock, cache: PackageCache, work: Path, *, name: str, digest: str,
           licenses: dict[str, str] | None = None) -> Bundle:
    """Find and download (verified, into the cache) the source of every locked package."""
    if lock.family is Family.DEB:
        found, gaps = _deb_sources(spec, lock, work)
    else:
        found, gaps = _rpm_sources(spec, lock)
    files = {f.sha256: f for s in found for f in s.files if not cache.has(f.sha256)}
    absent: dict[str, str] = {}  # sha256 -> why the mirror could not give it
    if files:
        bar = Progress(f"downloading {len(files)} source files", sum(f.size for f in files.values()))
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = {f.sha256: pool.submit(download, f.url, cache.path(f.sha256),
                                             sha256=f.sha256, size=f.size, progress=bar)
                       for f in files.values()}
            errors = {sha: fut.exception() for sha, fut in futures.items()}
        bar.close()
        for sha, err in sorted(errors.items()):
            if isinstance(err, NotFound):
                absent[sha] = f"the mirror does not serve {files[sha].name}"
            elif err is not None:
                raise err if isinstance(err, ProvisionError) else SourcesError(str(err))
    for s in list(found):
        gone = [absent[f.sha256] for f in s.files if f.sha256 in absent]
        if gone:
            found.remove(s)
            gaps.append((s.name, s.version, s.binaries, "; ".join(gone)))
    if lock.family is Family.RPM:
        _check_srpm_signatures(spec, lock, cache, found, work)
    licenses = licenses or {}
    missing = []
    for src, version, bins, reason in gaps:
        lic = " AND ".join(sorted({licenses.get(b, "NOASSERTION") for b in bins}))
        missing.append(Missing(src, version, bins, lic, any(
            is_copyleft(licenses.get(b, "NOASSERTION")) for b in bins), reason))
    return Bundle(name, digest, tuple(found), tuple(missing))


def report_missing(bundle: Bundle, allow_missing: bool) -> None:
    """List what is missing; refuse when copyleft sources are, unless allowed."""
    for m in bundle.missing:
        tag = "copyleft" if m.copyleft else "not copyleft"
        print(f"provision: sources: missing {m.name} {m.version} ({m.license}; {tag}): "
              f"{m.reason}", file=sys.stderr)
    copyleft = [m for m in bundle.missing if m.copyleft]
    if copyleft and not allow_missing:
        names = ", ".join(f"{m.name} {m.version}" for m in copyleft[:5])
        more = f" and {len(copyleft) - 5} more" if len(copyleft) > 5 else ""
        raise SourcesError(f"{len(copyleft)} copyleft source packages are missing ({names}{more}); "
                           "nothing was published (--allow-missing publishes without them)")


def publish_sources(ref: Ref, store: Store, *, cache_dir: Path | None = None,
                    allow_missing: bool = False) -> Bundle:
    """Gather a stored version's sources and publish them into the same store; the manifest
    becomes the version's `sources` artifact. Nothing is uploaded if copyleft sources are
    missing (unless allowed)."""
    from provision.cache import default_cache_dir
    from provision.stored import read_blob, stored_lock, stored_spec

    if not store.writable:
        raise SourcesError(f"{store.url} is a read-only store: run this where the environment "
                           "is published from")
    _env, version = store.read_index().resolve(ref)
    cache = PackageCache((cache_dir or default_cache_dir()) / "packages")
    with tempfile.TemporaryDirectory(prefix="provision-sources-") as tmp:
        work = Path(tmp)
        spec = stored_spec(store, version, work, ref.name)
        lock = stored_lock(store, version, work)
        sbom = read_blob(store, version.artifacts["sbom"], work) \
            if "sbom" in version.artifacts else None
        bundle = gather(spec, lock, cache, work / "apt", name=ref.name, digest=version.digest,
                        licenses=licenses_from_sbom(sbom))
        report_missing(bundle, allow_missing)
        for f in bundle.files():
            store.put_blob(f.digest, cache.path(f.sha256))
        manifest = work / "sources.json"
        manifest.write_bytes(bundle.manifest())
        digest = file_digest(manifest)
        store.put_blob(digest, manifest)
    new = replace(version, artifacts={"sources": digest})
    store.update_index(lambda index: index.with_version(ref.name, new, ()))
    return bundle
