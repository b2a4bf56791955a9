"""The three-line entry point: ``from openprompt_retro.quick import retroprompt`` (see :mod:`.prompt.factory`)."""
from .prompt.factory import retroprompt

__all__ = ["retroprompt"]
