"""Files that appear complete or not at all: one temporary-file-and-rename mechanism for every writer, and the
check every writer (and every command line, before its long work) makes of an output path."""

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def check_output_path(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Raise, naming ``path``, unless a file (or with ``folder``, a folder) can be written there; return it as a Path.

    A file path must not be a folder (nor end with a separator) and its folder must exist and be writable. A folder
    path, which the writer creates with its missing parents, must not be a file, and its nearest existing ancestor
    must be a writable folder.

    Raises:
        FileNotFoundError: the file's folder does not exist.
        IsADirectoryError: a file path names a folder.
        NotADirectoryError: a folder on the way is a file.
        PermissionError: the folder that would receive the file (or the new folder) is not writable.
    """
    text = os.fspath(path)
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"cannot write into {text!r}: it is a file, not a folder")
        parent = next(p for p in (path, *path.parents) if p.exists())
    else:
        if path.is_dir() or text.endswith(("/", os.sep)) or not text:
            raise IsADirectoryError(f"cannot write {text!r}: it names a folder, not a file")
        parent = path.parent
        if not parent.exists():
            raise FileNotFoundError(f"cannot write {text!r}: its folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {text!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {text!r}: its folder {str(parent)!r} is not writable")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` to fill a file beside ``path``, flush it to disk, then rename it over ``path``.

    ``os.replace`` is atomic on one file system, so a reader sees the old file or the whole new one, even across a
    crash; on any failure the temporary file is removed and an existing ``path`` is left as it was. The file gets
    the mode a plain ``open`` would give (0666 less the umask), whatever ``write`` left.

    Raises:
        FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError: as ``check_output_path``, before
            ``write`` runs.
    """
    path = check_output_path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # A fresh file (O_EXCL) with mode 0666 less the umask, as open() gives it.
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise type(error)(f"cannot write {str(path)!r}: {error.strerror or error}") from error
    mode = temporary.stat().st_mode
    try:
        write(temporary)
        # Some writers (safetensors' save_file) leave it 0600, unreadable to a group sharing the folder.
        os.chmod(temporary, mode)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``write_atomic`` of ``text`` (UTF-8)."""
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file that appears complete or not at all, even across a crash (``write_atomic``: an
    existing ``path`` is left as it was on any failure; mode 0666 less the umask)."""
    write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))
