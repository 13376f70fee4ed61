"""File helpers shared by every writer and reader of mixjax files: atomic writes, .npy headers.

:func:`write_atomic` is how mixjax writes any file (artifacts, run files, reports, plots): into a
temporary file beside the target, flushed and fsynced, then ``os.replace``\\ d over it, so a crash
leaves either the old file or the complete new one, never half a file. :func:`npy_header` reads a
``.npy`` header from a stream without reading the data, so a reader can check the declared shape
against the bytes present before it allocates anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np

__all__ = ["npy_header", "write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, text: bool = False):
    """Calls ``write(file)`` on a temporary file beside ``path``, then replaces ``path`` with it.

    Args:
      path: the file to write.
      write: writes the contents to the open file it is given.
      text: open the temporary file in text mode (default binary).

    Raises:
      OSError: the file cannot be written; whatever ``write`` raises. The temporary file is
        removed and ``path`` is untouched in either case.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)), prefix=".mixjax-", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` data ``stream`` is at; the stream is left
    at the first data byte.

    Raises:
      ValueError: no ``.npy`` magic, a format version other than 1.0 and 2.0, or a malformed
        header (NumPy's message).
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")
