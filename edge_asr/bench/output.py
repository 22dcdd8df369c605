"""How the bench and the soak hand over their report: its table, and its JSON on stdout or in a file."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item, digits) for item in value]
    return value


def json_text(data: Any, digits: int) -> str:
    """`data` (dicts, lists, tuples and plain values) as indented JSON, every float rounded to `digits` decimals."""
    return json.dumps(_rounded(data, digits), indent=2)


def print_report(table: str, report_json: Callable[[], str], json_path: str | None) -> bool:
    """Print the table, and the JSON where `json_path` says: on stdout for "-" (the table then goes to stderr), in
    that file for a path; False when the file cannot be written (said on stderr)."""
    if json_path == "-":
        print(table, file=sys.stderr)
        print(report_json())
        return True
    print(table)
    if json_path:
        try:
            Path(json_path).write_text(report_json() + "\n", encoding="utf-8")
        except OSError as err:
            print(f"edge-asr bench: cannot write {json_path}: {err.strerror or err}", file=sys.stderr)
            return False
    return True
