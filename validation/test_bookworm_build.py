"""The bookworm-build environment (envs/bookworm-build.yaml). `provision validate` runs this module
only for that environment (test_<name with - as _>.py), so it never needs to skip itself."""

from __future__ import annotations

from typing import Any

import pytest

ENV = "bookworm-build"


@pytest.mark.parametrize("tool", ["gcc", "g++", "make", "git"])
def test_tool_is_installed(host: Any, tool: str) -> None:
    assert host.exists(tool), f"{tool} is not on PATH"


def test_gcc_runs(host: Any) -> None:
    result = host.run("gcc --version")
    err = result.stderr.strip().splitlines()
    assert result.rc == 0, f"gcc --version exited {result.rc}: {err[-1] if err else ''}"
    assert result.stdout.startswith("gcc"), f"gcc --version printed {result.stdout[:60]!r}"


def test_builder_user(host: Any) -> None:
    builder = host.user("builder")
    assert builder.exists, "there is no user builder"
    assert builder.uid == 1000, f"builder has uid {builder.uid}, not 1000"
    assert builder.home == "/builds", f"builder's home is {builder.home}, not /builds"


def test_motd_names_the_environment(host: Any) -> None:
    motd = host.file("/etc/motd")
    assert motd.is_file, "/etc/motd is missing"
    assert ENV in motd.content_string, f"/etc/motd does not mention {ENV}"
