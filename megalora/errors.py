"""The one base of user errors.

A `UserError` is a mistake in what the user gave: a config key or flag, a data row, a path, a
checkpoint or model folder, a hub that refuses. Its message names the key, file or row at fault,
and the command line prints it as one line and exits 2. Every other exception (a bare
`ValueError`, `AssertionError` or `RuntimeError` from an internal invariant) is a bug in
megalora or a dependency and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the key, file or row at fault."""
