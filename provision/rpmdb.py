"""Reading a root's rpm database from outside, without changing the root.

rpm's sqlite backend leaves -wal/-shm files behind even for a read-only query, so the query
runs on a copy of the database files.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from provision import run
from provision.errors import ProvisionError


def query_rpmdb(dbdir: Path, queryformat: str, error: type[ProvisionError] = ProvisionError
                ) -> str:
    """`rpm -qa --qf QUERYFORMAT` against a copy of the database in `dbdir`."""
    with tempfile.TemporaryDirectory(prefix="provision-rpmdb-") as tmp:
        for f in dbdir.iterdir():
            if f.is_file() and not f.is_symlink():
                shutil.copy2(f, Path(tmp) / f.name)
        cmd: list[str] = ["rpm", f"--dbpath={tmp}"]
        if not (Path(tmp) / "rpmdb.sqlite").exists() and (Path(tmp) / "Packages").exists():
            cmd += ["--define", "_db_backend bdb_ro"]  # an old (Berkeley DB) rpmdb
        elif not (Path(tmp) / "rpmdb.sqlite").exists():
            raise error(f"{dbdir} holds no rpm database")
        return run.output([*cmd, "-qa", "--qf", queryformat])
