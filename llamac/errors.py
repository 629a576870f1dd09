"""llamac's one user-facing error type: the CLI prints its message on one line and exits non-zero."""


class LlamacError(Exception):
    """A problem with the user's input or environment, said in one line (no traceback)."""


class ShapeError(LlamacError, ValueError):
    """Operands whose shapes don't fit together; the message names both shapes."""


class DeviceError(LlamacError, ValueError):
    """Operands on different devices; the message names both."""
