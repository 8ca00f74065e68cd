"""Errors shared by every subcommand."""


class UserError(Exception):
    """A mistake the person at the keyboard can fix (bad flag, missing file): printed without a traceback."""
