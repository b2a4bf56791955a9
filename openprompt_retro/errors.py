"""Errors that name a user's mistake (bad option, missing file); the CLI prints them in one line."""


class UserError(Exception):
    """A mistake in what the user asked for; the message says what and how to fix it."""


def json_loads(text):
    """``json.loads``, with a document nested too deeply for the parser (a hand-edited or hostile line) read as
    what it is, malformed JSON: a ValueError, not a RecursionError that no caller expects."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to read") from None
