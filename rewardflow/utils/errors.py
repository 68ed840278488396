"""Failures the program expects and explains in one message (the CLI prints it without a traceback)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """Something outside the program's control stopped it.

    A reward server that stays down, a full disk, training that keeps diverging: the message names what failed,
    where, and what would work; what was saved is intact.
    """
