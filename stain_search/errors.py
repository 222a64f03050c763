"""Errors a user can fix.

Library code raises these; the CLI turns them into one line on stderr and exit
status 2, never a traceback. Anything else that escapes is a bug.
"""

from __future__ import annotations


class StainSearchError(Exception):
    """Bad input from the user (a config key, a data folder, an image...).

    The message must say what is wrong, where (file/key), and how to fix it.
    """


class ConfigError(StainSearchError):
    """A YAML file or key that cannot be used."""


class DataError(StainSearchError):
    """A data folder or image that cannot be used."""


class TrainingDiverged(StainSearchError):
    """A loss became NaN or infinite; the trial cannot continue."""


class StorageFull(StainSearchError):
    """The search's storage refused a write (no space, quota, read-only)."""


EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT-ended command


class SearchInterrupted(Exception):
    """The user (or a scheduler) stopped a search; `resume` continues it.
    Not a StainSearchError: nothing was wrong, and the exit status is 130."""

    def __init__(self, name: str, signame: str, command: str | None = None):
        self.name, self.signame = name, signame
        command = command or f"stain-search resume {name}"
        super().__init__(f"interrupted ({signame}) — `{command}` continues it")
