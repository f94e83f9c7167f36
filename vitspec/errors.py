"""The one error type a user sees: a message that names the file, key or allowed values."""


class VitspecError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with ``exit_code``.

    Example:
        >>> raise VitspecError("unknown model 'deit_smal'; closest: deit_small")
        Traceback (most recent call last):
        vitspec.errors.VitspecError: unknown model 'deit_smal'; closest: deit_small
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
