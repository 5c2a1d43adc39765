"""The `ospo` command line and the Prefect server/worker supervisor of `ospo serve`.

This package sits on top of the flows (ospo_cli -> flows -> tasks -> ospo_core), so the method core never imports
Prefect. Commands import Prefect and the flows lazily: `ospo inspect` and bad input answer at once.
"""

import os
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2, nothing written."""


class ServeError(RuntimeError):
    """A Prefect server or worker the command line started failed; printed as one line that says where its log is."""


def writable_folder(folder: Path, what: str) -> Path:
    """`folder`, created when missing and checked writable, so a read-only one is refused before a model loads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{what} {folder} is not writable ({exc.strerror}); pass --home or set OSPO_HOME to a "
                         "folder you can write") from None
    return folder
