"""What every entry point shares: the one error type for bad input, and where the repository is.

``ConfigError`` is raised for anything a user can fix on the command line or in a file (a wrong key, type
or value, a missing or unreadable data file, a run directory that does not match the request); the entry
points print it as one line, ``error: <message>``, and exit 2 — never a traceback.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A problem the user can fix; the message is one line naming the key or file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # force a single line
