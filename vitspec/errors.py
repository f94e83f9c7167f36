"""The one error type a user sees: a message that names the file, key or allowed values.

Messages name options the way the caller gave them: parameter names in the Python API
(``num_images``), flags on the command line (``--num-images``). :func:`option` renders a name for
whichever is running; the CLI switches it with :func:`cli_names`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CLI_NAMES: ContextVar[bool] = ContextVar("vitspec_cli_names", default=False)

# Parameters whose flag is not simply ``--`` + the name with dashes.
_FLAGS = {"model_kwargs": "--model-arg", "strict": "--non-strict", "img_size": "--img-size"}


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


def option(name: str, value: str | None = None) -> str:
    """``name`` as the caller spells it: ``num_images`` in Python, ``--num-images`` on the CLI.

    With ``value``, the whole setting: ``model_kwargs={'depth': 24}`` / ``--model-arg depth=24``
    for ``option("model_kwargs", "depth=24")``, ``overwrite=True`` / ``--overwrite`` for flags.

    Example:
        >>> option("num_images"), option("trust_checkpoint", "True")
        ('num_images', 'trust_checkpoint=True')
    """
    if not _CLI_NAMES.get():
        if value is not None and name == "model_kwargs":
            key, _, val = value.partition("=")
            return f"model_kwargs={{{key!r}: {val}}}"
        return name if value is None else f"{name}={value}"
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is None or value == "True":
        return flag
    return f"{flag} {value}"


@contextmanager
def cli_names() -> Iterator[None]:
    """Within the block, :func:`option` renders command-line flags (the CLI's messages)."""
    token = _CLI_NAMES.set(True)
    try:
        yield
    finally:
        _CLI_NAMES.reset(token)
