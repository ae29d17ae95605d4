"""Files that appear complete or not at all: one temporary-file-and-rename mechanism for every writer."""

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` to fill a file beside ``path``, flush it to disk, then rename it over ``path``.

    ``os.replace`` is atomic on one file system, so a reader sees the old file or the whole new one, even across a
    crash; on any failure the temporary file is removed and an existing ``path`` is left as it was. The file gets
    the mode a plain ``open`` would give (0666 less the umask), whatever ``write`` left.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # A fresh file (O_EXCL) with mode 0666 less the umask, as open() gives it.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
