"""User configuration: `$XDG_CONFIG_HOME/provision/config.yaml` (optional), then the environment.

    signing_key: ~/.config/provision/signing.key   # a publisher signs every index it writes
    public_key: ed25519:...                        # trusted for every store
    stores:                                        # or per store URL
      https://envs.example.org/: {public_key: "ed25519:..."}

$PROVISION_SIGNING_KEY and $PROVISION_PUBLIC_KEY override the file. Without `signing_key`, the
key `provision keygen` writes by default is used when it exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from provision.errors import ProvisionError
from provision.signing import parse_public_key


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "provision"


def default_signing_key() -> Path:
    return config_dir() / "signing.key"


@dataclass(frozen=True)
class Config:
    signing_key: Path | None = None
    public_key: str | None = None
    store_keys: dict[str, str] = field(default_factory=dict)

    def trusted_key(self, store_url: str) -> str | None:
        return self.store_keys.get(store_url.rstrip("/")) or self.public_key


def load_config(path: Path | None = None) -> Config:
    path = path or config_dir() / "config.yaml"
    data: dict[str, object] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ProvisionError(f"{path}: cannot read config ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ProvisionError(f"{path}: config must be a mapping")
        data = loaded or {}
    where = str(path)
    signing = os.environ.get("PROVISION_SIGNING_KEY") or data.get("signing_key")
    if signing is not None and not isinstance(signing, str):
        raise ProvisionError(f"{where}: signing_key must be a path")
    if signing is None and default_signing_key().is_file():
        signing = str(default_signing_key())
    public = os.environ.get("PROVISION_PUBLIC_KEY") or data.get("public_key")
    if public is not None:
        public = parse_public_key(str(public), f"{where}: public_key")
    store_keys: dict[str, str] = {}
    stores = data.get("stores") or {}
    if not isinstance(stores, dict):
        raise ProvisionError(f"{where}: stores must be a mapping of store URL to settings")
    for url, settings in stores.items():
        if not isinstance(settings, dict) or "public_key" not in settings:
            raise ProvisionError(f"{where}: stores.{url}: needs public_key")
        store_keys[str(url).rstrip("/")] = parse_public_key(
            str(settings["public_key"]), f"{where}: stores.{url}.public_key")
    return Config(Path(signing).expanduser() if signing else None, public, store_keys)
