"""Errors that name a user's mistake (bad option, missing file); the CLI prints them in one line."""


class UserError(Exception):
    """A mistake in what the user asked for; the message says what and how to fix it."""
