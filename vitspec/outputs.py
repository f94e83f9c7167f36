"""Output directories that appear whole or not at all, and that replace only vitspec's own output.

Every command writes into a temporary sibling of ``out`` (``.NAME.vitspec-tmp-XXXX``) that is
created *before* the work, so an unwritable location fails in the first second, and renamed
into place at the end. On an error, Ctrl-C or SIGTERM (a scheduler's time limit) the temporary
folder is removed and ``out`` is left as it was.

What may be replaced (``overwrite=True`` / ``--overwrite``): only a directory that vitspec wrote,
recognised by its manifest (``run.json``, ``verify.json``, ``compare.json``, ``report.json`` or
``index.json``) carrying ``"written_by": "vitspec"`` and the list of ``files`` written, and that
holds nothing else. Never ``.``, ``..``, the home directory, the filesystem root, an ancestor of
the current directory, or a folder given as input (``--images``). An empty directory is used as
is. Folders are created with the user's umask (normally 0755), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vitspec.errors import VitspecError, option

MANIFESTS = ("run.json", "verify.json", "compare.json", "report.json", "index.json")
WRITTEN_BY = "vitspec"
_TMP_TAG = ".vitspec-tmp-"
_OLD_TAG = ".vitspec-old-"
_SHOWN = 4


def check_out_dir(out: str | Path, overwrite: bool = False, protect: Iterable = ()) -> None:
    """Refuse an ``out`` that exists (unless ``overwrite`` and it is vitspec's own output).

    Args:
        out: the output directory.
        overwrite: allow replacing a previous vitspec output there.
        protect: input paths (an image folder) that ``out`` must not be or contain.

    Example:
        >>> check_out_dir(".", overwrite=True)
        Traceback (most recent call last):
        vitspec.errors.VitspecError: refusing to replace . (the current directory)
    """
    out = Path(out).expanduser()
    _check_not_precious(out, protect)
    if out.is_symlink():
        raise VitspecError(f"output path {out} is a symbolic link; give the real directory")
    if not out.exists():
        _check_parent(out)
        return
    if not out.is_dir():
        raise VitspecError(f"output path {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise VitspecError(
            f"output directory {out} exists; pass {option('overwrite', 'True')} to replace "
            "a previous vitspec output there"
        )
    manifest = read_manifest(out)
    if manifest is None:
        raise VitspecError(
            f"refusing to replace {out}: it is not a vitspec output (it holds {_listing(entries)}; "
            f"no {'/'.join(MANIFESTS[:3])} written by vitspec)"
        )
    foreign = [e for e in entries if e not in set(manifest.get("files", ()))]
    if foreign:
        raise VitspecError(
            f"refusing to replace {out}: it holds files vitspec did not write "
            f"({_listing(foreign)}); move them away or choose another output directory"
        )


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of a directory vitspec wrote (see the module docstring), or None.

    Example:
        >>> read_manifest(".") is None
        True
    """
    found = _manifest(Path(folder))
    return found[1] if found else None


def _manifest(folder: Path) -> tuple[Path, dict] | None:
    for name in MANIFESTS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("written_by") == WRITTEN_BY:
            return path, data
    return None


class OutputDir:
    """A claimed output location: checked, with its temporary sibling created, before the work.

    Use as a context manager: the block writes into ``tmp``; leaving it normally seals the
    manifest and swaps ``tmp`` into place, leaving it by an exception (Ctrl-C, SIGTERM
    included) removes ``tmp`` and leaves ``out`` as it was.

    Args:
        out: the output directory.
        overwrite: allow replacing a previous vitspec output (see :func:`check_out_dir`).
        protect: input paths ``out`` must not be or contain (e.g. the image folder).

    Example:
        >>> import json, tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with OutputDir(root / "run") as tmp:
        ...     _ = (tmp / "run.json").write_text(json.dumps({"model": "m"}))
        >>> read_manifest(root / "run")["files"]
        ['run.json']
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, protect: Iterable = ()):
        self.out = Path(out).expanduser()
        check_out_dir(self.out, overwrite, protect)
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)  # honours the umask
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{_TMP_TAG}", dir=parent))
            os.chmod(self.tmp, 0o777 & ~_umask())
        except OSError as exc:
            raise VitspecError(f"cannot write to {self.out}: {exc.strerror or exc}") from None
        self._saved_handlers: dict[int, object] = {}

    def __enter__(self) -> Path:
        self._catch_signals()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.discard()
        finally:
            self._restore_signals()

    def commit(self) -> Path:
        """Seal the manifest and move ``tmp`` into place (the old output is removed last)."""
        seal(self.tmp)
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{_OLD_TAG}", dir=self.out.parent))
            os.replace(self.out, old / "previous")
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", self.out)
                shutil.rmtree(old, ignore_errors=True)
            self.discard()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        """Remove the temporary folder (idempotent)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _catch_signals(self) -> None:
        """SIGTERM / SIGHUP end the run like Ctrl-C, so the temporary folder is removed."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._saved_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers.clear()


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, protect: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``out`` that replaces ``out`` when the block ends.

    The same as ``with OutputDir(out, overwrite=overwrite, protect=protect) as tmp``.
    """
    with OutputDir(out, overwrite=overwrite, protect=protect) as tmp:
        yield tmp


def read_info(path: str | Path) -> dict:
    """A manifest file's content without the folder's own keys (``written_by``, ``files``): the
    result's provenance as it was before saving."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if k not in ("written_by", "files")}


def record_files(folder: str | Path, paths: Iterable) -> None:
    """Add files vitspec just wrote into a folder it wrote before (``vitspec report RUN``
    drawing a run's figures) to its manifest, so ``overwrite`` may replace them later. A folder
    without a vitspec manifest (a temporary folder not yet sealed) is left alone."""
    folder = Path(folder)
    found = _manifest(folder)
    if found is None:
        return
    path, data = found
    names = {Path(p).relative_to(folder).parts[0] for p in paths}
    data["files"] = sorted(set(data.get("files", [])) | names)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def seal(folder: Path) -> None:
    """Mark the folder's manifest as vitspec's and list every entry it holds (``OutputDir``
    seals its top folder; a command that writes run folders inside it seals each of them)."""
    for name in MANIFESTS:
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["written_by"] = WRITTEN_BY
            data["files"] = sorted(p.name for p in folder.iterdir())
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")
            return
    raise AssertionError(f"no manifest ({', '.join(MANIFESTS)}) written into {folder}")


def _check_not_precious(out: Path, protect: Iterable) -> None:
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    named = {
        cwd: "the current directory",
        Path.home().resolve(): "the home directory",
        Path(resolved.anchor): "the filesystem root",
    }
    if resolved in named:
        raise VitspecError(f"refusing to replace {out} ({named[resolved]})")
    if cwd.is_relative_to(resolved):
        raise VitspecError(f"refusing to replace {out}: it contains the current directory")
    for path in protect:
        if path is None or not isinstance(path, (str, os.PathLike)):
            continue
        given = Path(path).expanduser().resolve()
        if given.is_relative_to(resolved):
            raise VitspecError(f"refusing to write to {out}: it holds the input {path}")


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of a new ``out`` must be a directory we may write in."""
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VitspecError(f"cannot write to {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise VitspecError(f"cannot write to {out}: no permission to create folders in {ancestor}")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
