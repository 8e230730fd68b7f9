"""The store's index: which environments exist, their versions (by digest) and tags.

`index.json` is the only mutable file of a store; everything it points at is an immutable,
content-addressed blob. References: `name`, `name:tag`, `name@sha256:<hex>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from provision.errors import StoreError
from provision.signing import Signer, sign_document, verify_document

INDEX_SCHEMA = 1
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REF_RE = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._-]{0,62})(?::(?P<tag>[A-Za-z0-9._-]{1,64}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class Version:
    digest: str  # sha256:<hex> of the compressed archive: the environment's identity
    created: str
    lock_digest: str  # the lock file, itself stored as a blob
    size: int
    tar_sha256: str
    tar_size: int
    compression: str
    source_date_epoch: int
    packages: tuple[str, ...]  # "name evr arch"
    # Other outputs of the same environment version: "qcow2", "vagrant" -> blob digest.
    artifacts: dict[str, str] = field(default_factory=dict)
    # Public AMIs made from the version's VM image: region -> AMI id.
    amis: dict[str, str] = field(default_factory=dict)

    @property
    def package_count(self) -> int:
        return len(self.packages)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packages"] = list(self.packages)
        d["package_count"] = self.package_count
        d["artifacts"] = dict(sorted(self.artifacts.items()))
        d["amis"] = dict(sorted(self.amis.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Version:
        return cls(
            digest=d["digest"], created=d["created"], lock_digest=d["lock_digest"],
            size=int(d["size"]), tar_sha256=d["tar_sha256"], tar_size=int(d["tar_size"]),
            compression=d["compression"], source_date_epoch=int(d["source_date_epoch"]),
            packages=tuple(d["packages"]),
            artifacts=dict(d.get("artifacts", {})),
            amis=dict(d.get("amis", {})),
        )


@dataclass(frozen=True)
class Environment:
    name: str
    versions: tuple[Version, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    def version(self, digest: str) -> Version | None:
        return next((v for v in self.versions if v.digest == digest), None)


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_ref(text: str) -> Ref:
    m = REF_RE.match(text)
    if not m:
        raise StoreError(f"{text!r} is not a reference (use NAME, NAME:TAG or NAME@sha256:HEX)")
    return Ref(m["name"], m["tag"], m["digest"])


@dataclass(frozen=True)
class Index:
    environments: dict[str, Environment] = field(default_factory=dict)
    # The public key the index was signed by, when read from a signed index.
    signed_by: str | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ (de)serialization
    def to_json(self, signer: Signer | None = None) -> str:
        data: dict[str, Any] = {
            "schema": INDEX_SCHEMA,
            "environments": {
                name: {
                    "tags": dict(sorted(env.tags.items())),
                    "versions": [v.to_dict() for v in env.versions],
                }
                for name, env in sorted(self.environments.items())
            },
        }
        if signer is not None:
            data = sign_document(data, signer)
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "index.json",
                  trusted_key: str | None = None) -> Index:
        """Parse an index; with `trusted_key`, only one signed by that key is accepted."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise StoreError(f"{where}: not a valid index (not a JSON object)")
            signed_by = verify_document(data, trusted_key, where)
            if data.get("schema") != INDEX_SCHEMA:
                raise StoreError(f"{where}: index schema {data.get('schema')!r} is not supported")
            envs = {}
            for name, e in data["environments"].items():
                versions = tuple(Version.from_dict(v) for v in e["versions"])
                for v in versions:
                    if not DIGEST_RE.match(v.digest):
                        raise StoreError(f"{where}: {name} has a malformed digest {v.digest!r}")
                envs[name] = Environment(name, versions, dict(e.get("tags", {})))
            return cls(envs, signed_by)
        except StoreError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{where}: not a valid index ({e!r})") from None

    # ------------------------------------------------------------------ queries and updates
    def resolve(self, ref: Ref) -> tuple[Environment, Version]:
        env = self.environments.get(ref.name)
        if env is None:
            known = ", ".join(sorted(self.environments)) or "none"
            raise StoreError(f"no environment named {ref.name!r} in the store (known: {known})")
        if ref.digest:
            v = env.version(ref.digest)
            if v is None:
                raise StoreError(f"{ref.name} has no version {ref.digest}")
            if ref.tag and env.tags.get(ref.tag) != ref.digest:
                raise StoreError(f"{ref.name}:{ref.tag} is not {ref.digest}")
            return env, v
        tag = ref.tag or "latest"
        digest = env.tags.get(tag)
        v = env.version(digest) if digest else None
        if v is None:
            raise StoreError(f"{ref.name} has no tag {tag!r}")
        return env, v

    def with_version(self, name: str, version: Version, tags: tuple[str, ...] = ("latest",)
                     ) -> Index:
        """Add a version (kept once per digest: the first record wins, but gains the artifacts
        of later ones) and point tags at it."""
        env = self.environments.get(name, Environment(name))
        old = env.version(version.digest)
        if old is None:
            versions = (*env.versions, version)
        else:
            merged = replace(old, artifacts={**old.artifacts, **version.artifacts},
                             amis={**old.amis, **version.amis})
            versions = tuple(merged if v.digest == version.digest else v for v in env.versions)
        new_tags = {**env.tags, **{t: version.digest for t in tags}}
        envs = {**self.environments, name: replace(env, versions=versions, tags=new_tags)}
        return Index(envs)

    def with_amis(self, name: str, digest: str, amis: dict[str, str]) -> Index:
        """Record AMI ids (region -> id) for a version already in the index."""
        env = self.environments.get(name)
        old = env.version(digest) if env else None
        if env is None or old is None:
            raise StoreError(f"{name}@{digest} is not in the index")
        new = replace(old, amis={**old.amis, **amis})
        versions = tuple(new if v.digest == digest else v for v in env.versions)
        return Index({**self.environments, name: replace(env, versions=versions)})
