"""The marker of a deliberate refusal: a check that declines to start or continue a run (resuming under another
config, data or lr schedule, a checkpoint that would run code, a folder another run holds). Such a run ends with
status ``refused`` in its ``.mimlab-run.json``; any other error with ``failed``."""

from __future__ import annotations


class Refusal(Exception):
    """Mixed into the error classes of those checks; their message says why and what to do."""
