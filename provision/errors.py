"""The one error root. Everything the CLI reports as a one-line error is a ProvisionError."""

from __future__ import annotations


class ProvisionError(Exception):
    """Base of every error this project raises on purpose; str() is the one-line message."""


class SpecError(ProvisionError):
    """A spec file is malformed. Carries one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class LockError(ProvisionError):
    """A lock is missing, stale, or cannot be resolved."""


class MirrorUnreachable(ProvisionError):
    """A package mirror could not be reached."""


class DigestMismatch(ProvisionError):
    """Downloaded or stored bytes do not have the digest they were promised to have."""


class ArchiveError(ProvisionError):
    """An archive is corrupt, truncated or hostile."""


class StoreError(ProvisionError):
    """A store cannot be read or written, or does not hold what was asked for."""


class CommandFailed(ProvisionError):
    """An external command exited non-zero."""

    def __init__(self, argv: list[str], returncode: int, stderr: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        msg = f"{argv[0]} failed with exit code {returncode}"
        if tail:
            msg += f": {tail}"
        super().__init__(msg)
