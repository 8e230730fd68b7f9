"""Shared helpers for the tests that build whole environments through the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provision.cli import main


@dataclass(frozen=True)
class Cli:
    """The CLI in-process, with its own store and cache."""

    store: Path | str | None  # None: no --store (the pin's store, or the default)
    cache: Path
    capfd: pytest.CaptureFixture[str]

    def __call__(self, *args: str, rc: int = 0) -> tuple[str, str]:
        self.capfd.readouterr()
        store = ["--store", str(self.store)] if self.store is not None else []
        argv = [args[0], *store, "--cache", str(self.cache), *args[1:]]
        got = main(argv)
        out, err = self.capfd.readouterr()
        assert got == rc, f"provision {' '.join(argv)} exited {got}, not {rc}:\n{err}"
        return out, err

    @property
    def store_path(self) -> Path:
        assert isinstance(self.store, Path)
        return self.store

    def json(self, *args: str) -> dict[str, Any]:
        out, _ = self(*args, "--json")
        data: dict[str, Any] = json.loads(out)
        return data


def leftovers(path: Path) -> list[Path]:
    """Temporary files or directories a failed operation might have left."""
    if not path.exists():
        return []
    return [p for p in path.rglob("*") if p.name.startswith(".") and
            (".tmp" in p.name or ".part" in p.name or ".download" in p.name or "blob-" in p.name)]
