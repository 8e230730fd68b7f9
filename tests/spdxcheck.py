"""Validate an SPDX document with the reference spdx-tools (its parser, then its full validator)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from spdx_tools.spdx.parser.error import SPDXParsingError
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import (
    validate_full_spdx_document,
)


def validate_spdx(path: Path) -> list[str]:
    """Every problem spdx-tools finds in the document at `path` (its name says the format, e.g.
    `.spdx.json`), one string each; an empty list means it is a valid SPDX 2.3 document."""
    if not path.name.endswith(".json"):  # a store blob: spdx-tools picks its parser by name
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / "sbom.spdx.json"
            shutil.copyfile(path, named)
            return validate_spdx(named)
    try:
        document = parse_file(str(path))
    except SPDXParsingError as e:
        return [f"parse: {m}" for m in e.messages]
    return [f"{m.context.spdx_id or m.context.element_type}: {m.validation_message}"
            for m in validate_full_spdx_document(document, "SPDX-2.3")]
