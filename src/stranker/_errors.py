"""The error stranker raises on input it cannot use (exported as ``sr.InputError``)."""


class InputError(ValueError):
    """Raised when an input does not have what stranker needs; the message names the problem and the fix."""
