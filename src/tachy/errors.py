"""Typed exceptions: every error a user can cause surfaces as one of these, never a deep traceback."""


class TachyError(Exception):
    """Base class for errors caused by user input or environment, shown as one line by the CLI."""


class ModelLoadError(TachyError):
    """A model name, folder or file that cannot be loaded (unknown, missing, corrupt, unsupported)."""


class UnknownNameError(TachyError, KeyError):
    """A name (model, drafter, press, method) not in its registry; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ContextLengthError(TachyError, ValueError):
    """A prompt (plus requested new tokens) longer than the model's context window."""


class InvalidArgumentError(TachyError, ValueError):
    """A sampling value or option outside its valid range."""
