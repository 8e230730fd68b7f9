from __future__ import annotations

from collections.abc import Iterator

import pytest
from yumrepo import HttpServer, YumRepo, build_yum_repo


@pytest.fixture(scope="session")
def yum_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[YumRepo, str]]:
    """A GPG-signed yum repo of tiny RPMs (see tests/yumrepo.py) served over HTTP.

    Yields ``(repo, base_url)``; ``base_url`` is ``http://127.0.0.1:<port>/`` and ends in "/".
    The server is stopped when the session ends.
    """
    repo = build_yum_repo(tmp_path_factory.mktemp("yumrepo"))
    with HttpServer(repo.path) as server:
        yield repo, server.url


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite builds roots, mounts and chroots: it runs as root, or not at all (never a skip)."""
    import os

    if os.geteuid() != 0:
        pytest.exit("the test suite needs root (it builds roots, mounts and chroots)", returncode=2)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server on http://127.0.0.1:<port> for the session (S3 and EC2, all regions)."""
    from motoserver import moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> str:
    """Fake credentials and moto's endpoint in this process's environment; returns the endpoint."""
    from motoserver import FAKE_CREDENTIALS

    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_endpoint
