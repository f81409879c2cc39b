"""The one exception type users see.

Every package raises a subclass of `AscendDeployError` for problems the user can fix (bad input
file, impossible layout, missing backend). The CLI prints such an error as a single line naming the
file, tensor or option and what was expected, and exits 2; so does an OSError on a path the user named
(missing folder, permissions, full disk). Anything else is a bug and keeps its traceback.
"""

import json
from pathlib import Path


class AscendDeployError(Exception):
    """A user-facing error: its message is complete on one line."""


def parse_json(text: str | bytes):
    """`json.loads` for documents users give (configs, headers, plans, manifests, requests): one nested too deeply
    for the parser raises ValueError like any other malformed JSON (json itself raises RecursionError), so the
    caller's `except ValueError` covers every bad document (an integer of over 4,300 digits is a ValueError too)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json_object(path: Path, error: type[AscendDeployError], unreadable: str) -> dict:
    """The JSON object in file `path`, or `error` naming it: "PATH: UNREADABLE (why)" when it cannot be read or
    parsed, "PATH: expected a JSON object" when it holds another JSON value."""
    try:
        data = parse_json(path.read_text())
    except (OSError, ValueError) as e:          # ValueError: not JSON, or not UTF-8
        raise error(f"{path}: {unreadable} ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
