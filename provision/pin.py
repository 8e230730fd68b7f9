"""The pin file: committed in a source tree, it says which environment the tree builds in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from provision.errors import ProvisionError
from provision.fsutil import write_atomic
from provision.index import DIGEST_RE, Ref, parse_ref
from provision.signing import parse_public_key

PIN_FILE = "provision.pin"


@dataclass(frozen=True)
class Pin:
    name: str
    digest: str
    store: str
    # The key the store's index must be signed by (None: not pinned).
    public_key: str | None = None

    @property
    def ref(self) -> Ref:
        return Ref(self.name, None, self.digest)


def find_pin(start: Path | None = None) -> Path | None:
    """The nearest pin file in the current directory or above it."""
    here = (start or Path.cwd()).absolute()
    for d in (here, *here.parents):
        if (d / PIN_FILE).is_file():
            return d / PIN_FILE
    return None


def read_pin(path: Path) -> Pin:
    try:
        data = json.loads(path.read_text())
        key = data.get("public_key")
        pin = Pin(name=data["name"], digest=data["digest"], store=data["store"],
                  public_key=parse_public_key(str(key), f"{path}: public_key") if key else None)
    except FileNotFoundError:
        raise ProvisionError(f"{path}: no pin file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProvisionError(f"{path}: not a valid pin file ({e!r})") from None
    parse_ref(pin.name)
    if not DIGEST_RE.match(pin.digest):
        raise ProvisionError(f"{path}: digest {pin.digest!r} is not sha256:<hex>")
    return pin


def write_pin(pin: Pin, path: Path) -> None:
    data = {"name": pin.name, "digest": pin.digest, "store": pin.store}
    if pin.public_key:
        data["public_key"] = pin.public_key
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    try:
        write_atomic(path, text)
    except OSError as e:
        raise ProvisionError(f"cannot write {path}: {e.strerror}") from None
