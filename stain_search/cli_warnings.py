"""The library's own warnings, as the command line shows them.

Library code warns with ``warnings.warn`` (a caller may filter or record it);
at the command line each of those is one line, ``stain-search: warning: …``,
as its errors are ``stain-search: error: …``, not Python's file, line number
and source line. Anyone else's warnings show as Python shows them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

OURS = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "trainables")


@contextlib.contextmanager
def one_line_warnings():
    """While a verb runs: our UserWarnings as one line on stderr."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        where = Path(filename).resolve()
        if issubclass(category, UserWarning) and any(where.is_relative_to(d) for d in OURS):
            print(f"stain-search: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
