"""The file formats :func:`mixjax.data.load` reads, header first: IDX files and ``.npz`` archives.

Each reader reads the headers first (IDX's dimension sizes, each ``.npy`` member's shape and
dtype), checks them against the file's size and against each other (a ``check`` callback of the
caller: ranks, dtypes, counts) and only then reads the data, exactly as much as the header
announces: a raw IDX file must have the size its header gives (compared before reading), a gzip
stream is inflated no further than that size plus one byte (to detect extra data), and an
``.npz`` member must hold the bytes its ``.npy`` header announces (the zip's recorded size,
compared before reading). So a truncated, padded or decompression-bomb file is refused before it
costs more memory than its header admits. Corrupt gzip or zip data is a ``ValueError`` that
names the file.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import BinaryIO, NamedTuple

import numpy as np

from mixjax import _files

__all__ = ["Header", "read_idx", "read_idx_pair", "read_npz_pair"]

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Deflate cannot inflate more than 1032-fold (a 258-byte match costs at least 2 bits); gzip's
# headers only lower the ratio. A header claiming more than this of a .gz file is impossible.
_GZIP_MAX_RATIO = 1032
_CHUNK = 1 << 24
# What a gzip or zip stream raises when it is corrupt or truncated.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, NotImplementedError)


class Header(NamedTuple):
    """An array's layout as its file's header gives it, before any data is read.

    Attributes:
      shape: the array's shape.
      dtype: its dtype, in the file's byte order.
      offset: the bytes of header before the data.
      nbytes: the bytes of data, ``prod(shape) * dtype.itemsize``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int


# ``check(images_header, labels_header)``: raises when the pair cannot be a dataset.
Check = Callable[[Header, Header], None]


@contextlib.contextmanager
def _stream_errors(where: str, what: str):
    """Turns the errors of a corrupt gzip / zip stream into a ``ValueError`` naming the file."""
    try:
        yield
    except _STREAM_ERRORS as err:
        raise ValueError(f"{where}{what} ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------
# IDX files.


def _idx_header(f: BinaryIO, where: str, size: int, compressed: bool) -> Header:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise ValueError(
            f"{where}: not an IDX file: magic number {magic.hex()!r}, expected 0000 then a "
            f"type code in {[f'{c:02x}' for c in _IDX_DTYPES]} and a dimension count >= 1"
        )
    dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
    offset = 4 + 4 * ndim
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{where}: truncated header: {ndim} dims need {offset} bytes")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
    if 0 in shape:
        raise ValueError(f"{where}: header says shape {shape}; every size must be >= 1")
    header = Header(shape, dtype, offset, math.prod(shape) * dtype.itemsize)
    expected = offset + header.nbytes
    says = f"header says shape {shape} of {dtype.name} ({expected} bytes)"
    if compressed and expected > _GZIP_MAX_RATIO * size:
        raise ValueError(
            f"{where}: {says}, more than a {size}-byte gzip file can hold (deflate inflates at "
            f"most {_GZIP_MAX_RATIO}-fold); the file is truncated or corrupt"
        )
    if not compressed and expected != size:
        problem = "truncated" if size < expected else "extra data"
        raise ValueError(f"{where}: {says}, but the file holds {size} bytes ({problem})")
    return header


def _idx_data(f: BinaryIO, header: Header, where: str, compressed: bool) -> np.ndarray:
    buf = np.empty(header.nbytes, np.uint8)  # pages are only touched as data arrives
    view, got = memoryview(buf), 0
    while got < header.nbytes:
        n = f.readinto(view[got : got + _CHUNK])
        if not n:
            break
        got += n
    extra = got == header.nbytes and bool(f.read(1))
    if got < header.nbytes or extra:
        held = f"more than {header.offset + got}" if extra else f"{header.offset + got}"
        raise ValueError(
            f"{where}: header says shape {header.shape} of {header.dtype.name} "
            f"({header.offset + header.nbytes} bytes), but the "
            f"{'decompressed data' if compressed else 'file'} holds {held} bytes "
            f"({'extra data' if extra else 'truncated'})"
        )
    array = buf.view(header.dtype).reshape(header.shape)
    if not header.dtype.isnative:
        array = array.byteswap(inplace=True).view(header.dtype.newbyteorder("="))
    return array


class _IdxFile:
    """One IDX file open for reading: :meth:`header`, then :meth:`data`."""

    def __init__(self, path: str | os.PathLike, stack: contextlib.ExitStack):
        self.where = f"mixjax.data.read_idx: {os.fspath(path)!r}"
        raw = stack.enter_context(open(path, "rb"))
        self.size = os.fstat(raw.fileno()).st_size
        self.compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        self.f = stack.enter_context(gzip.GzipFile(fileobj=raw)) if self.compressed else raw
        self._header: Header | None = None

    def header(self) -> Header:
        with _stream_errors(self.where, ": corrupt or truncated gzip data"):
            self._header = _idx_header(self.f, self.where, self.size, self.compressed)
        return self._header

    def data(self) -> np.ndarray:
        with _stream_errors(self.where, ": corrupt or truncated gzip data"):
            return _idx_data(self.f, self._header, self.where, self.compressed)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (the MNIST format), raw or gzip-compressed (detected by content).

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes (each ``>= 1``) and the big-endian data in C order. The header
    is read first: a raw file must have exactly the size it announces (checked before reading),
    a gzip file cannot announce more than deflate can inflate it to (1032-fold), and its stream
    is inflated no further than the announced size plus one byte, so a bomb whose header
    understates its data is refused with little memory.

    Returns:
        The array, in native byte order, with the shape the header gives.

    Raises:
        ValueError: corrupt gzip data, a bad magic number or type code, a zero size, or a data
            size that disagrees with the header (truncated or extra data); the message names
            the file.
    """
    with contextlib.ExitStack() as stack:
        idx = _IdxFile(path, stack)
        idx.header()
        return idx.data()


def read_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike, check: Check
) -> tuple[np.ndarray, np.ndarray]:
    """Reads an images and a labels IDX file, calling ``check`` on both headers first.

    Raises:
      ValueError: as :func:`read_idx`; whatever ``check`` raises, before any data is read.
    """
    with contextlib.ExitStack() as stack:
        images, labels = (_IdxFile(path, stack) for path in (images_path, labels_path))
        check(images.header(), labels.header())
        return images.data(), labels.data()


# ---------------------------------------------------------------------------------------------
# npz archives.


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Header:
    name = info.filename
    with zf.open(info) as f:
        try:
            shape, _, dtype = _files.npy_header(f)
        except ValueError as err:
            raise ValueError(f"{where}: member {name!r} has no valid .npy header: {err}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(
            f"{where}: member {name!r} holds an object array ({dtype}), which needs pickle; refused"
        )
    header = Header(tuple(shape), dtype, offset, math.prod(shape) * dtype.itemsize)
    if offset + header.nbytes != info.file_size:
        raise ValueError(
            f"{where}: member {name!r}: its header says shape {header.shape} of {dtype} "
            f"({offset + header.nbytes} bytes), but it holds {info.file_size} bytes"
        )
    return header


def read_npz_pair(
    fn_name: str, path: str, layouts: Sequence[tuple[str, str]], check: Check
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the first ``(images, labels)`` pair of array names in ``layouts`` that the ``.npz``
    archive at ``path`` holds (without pickle), calling ``check`` on both headers first.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not a zip archive (a single ``.npy`` array included), corrupt or truncated
        zip data (bad CRC), a member without a valid ``.npy`` header, an object array, a member
        whose size disagrees with its header, no pair of ``layouts`` in the archive; whatever
        ``check`` raises, before any data is read. Messages start ``fn_name: 'path'``.
    """
    where = f"{fn_name}: {path!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn_name}: npz file {path!r} does not exist")
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(f"{where} holds a single array, not an .npz archive")
    with _stream_errors(where, " is not a readable .npz file"), zipfile.ZipFile(path) as zf:
        members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
        for keys in layouts:
            if all(k in members for k in keys):
                infos = [members[k] for k in keys]
                check(*(_npy_header(zf, info, where) for info in infos))
                arrays = []
                for info in infos:
                    with zf.open(info) as member:
                        arrays.append(np.lib.format.read_array(member, allow_pickle=False))
                return arrays[0], arrays[1]
    expected = " or ".join(" and ".join(keys) for keys in layouts)
    raise ValueError(f"{where} has arrays {sorted(members)}; expected {expected}")
