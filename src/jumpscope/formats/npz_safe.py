"""Reading an ``.npz`` archive of plain numeric arrays without trusting it.

``np.load`` decompresses a member in full before anything can be checked, so a member that
declares a 40 GB shape, or a zip bomb, costs that much memory first. Here every member's ``.npy``
header (shape, dtype, layout) is read and checked against the zip directory's declared sizes,
and the caller checks the shapes against each other, before any data is decompressed; the data
is then read with a cap of exactly the declared size. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import FormatError
from ..safeio import check_regular_file, one_line

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
MAX_HEADER = 10_000  # numpy's own default bound on an .npy header
# Float weights barely compress (trained ones ~1.1x); an archive inflating more than BOMB_RATIO
# times past BOMB_BYTES is a zip bomb, refused before it is decompressed.
BOMB_BYTES, BOMB_RATIO = 64 << 20, 20
# What a corrupt or hostile zip or .npy header can raise while being read.
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, EOFError, OSError,
                ValueError, TypeError, KeyError, RuntimeError, SyntaxError, RecursionError, MemoryError,
                OverflowError, UnicodeDecodeError, tokenize.TokenError)

Header = tuple[tuple[int, ...], np.dtype, bool]  # shape, dtype, fortran_order


def read_npz(file: Path, names: tuple[str, ...], check: Callable[[dict[str, Header]], None]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the archive ``file`` (exactly those members, ``name.npy``), after
    ``check(headers)`` accepted their headers; any problem is a FormatError naming ``file``."""
    check_regular_file(file)
    with open(file, "rb") as handle:
        start = handle.read(8)
    if start.startswith(NPY_MAGIC):
        raise FormatError(f"{file} holds a single .npy array, not an npz archive with keys {list(names)}")
    if not start.startswith(ZIP_MAGICS):
        raise FormatError(f"{file} is not an npz archive (not a zip file; reading it as a pickle is refused)")
    try:
        with zipfile.ZipFile(file) as archive:
            members = _members(archive, names, file)
            headers = {name: _header(archive, info, file, name) for name, info in members.items()}
            check(headers)
            _check_inflation(members, file)
            return {name: _data(archive, members[name], headers[name], file, name) for name in names}
    except FormatError:
        raise
    except _READ_ERRORS as error:
        raise FormatError(f"{file} is truncated or not a valid npz archive ({one_line(error)})") from None


def _members(archive: zipfile.ZipFile, names: tuple[str, ...], file: Path) -> dict[str, zipfile.ZipInfo]:
    infos = archive.infolist()
    stems = [info.filename.removesuffix(".npy") for info in infos]
    if len(set(stems)) != len(stems):
        raise FormatError(f"{file}: the archive lists a member twice; refused")
    missing, unexpected = sorted(set(names) - set(stems)), sorted(set(stems) - set(names))
    if missing or unexpected or any(not info.filename.endswith(".npy") for info in infos):
        raise FormatError(f"{file}: Gemma Scope params need exactly the keys {list(names)}; "
                          f"missing {missing}, unexpected {_short(unexpected)}")
    return dict(zip(stems, infos))


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file: Path, name: str) -> Header:
    """The member's (shape, dtype, fortran_order), checked against its declared size in the zip
    directory (so reading its data later cannot decompress more than that)."""
    with archive.open(info) as stream:
        if stream.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise FormatError(f"{file}: member {info.filename!r} is not a .npy array")
        version = tuple(stream.read(2))
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise FormatError(f"{file}: member {info.filename!r} has unsupported .npy version {version}")
        try:
            shape, fortran, dtype = readers[version](stream, max_header_size=MAX_HEADER)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, tokenize.TokenError) as error:
            raise FormatError(f"{file}: array {name!r} has an invalid .npy header ({one_line(error)})") from None
        header_bytes = stream.tell()
    if dtype.hasobject:
        raise FormatError(f"{file}: array {name!r} is an object (pickled) array; refused, "
                          "Gemma Scope params hold float arrays only")
    if dtype.kind != "f" or dtype.subdtype is not None or dtype.names:
        raise FormatError(f"{file}: array {name!r} has dtype {dtype}; Gemma Scope params are float32")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise FormatError(f"{file}: array {name!r} declares an invalid shape {_short(shape)}")
    size = math.prod(shape) * dtype.itemsize
    if info.file_size != header_bytes + size:
        raise FormatError(f"{file}: array {name!r} declares shape {_short(shape)} ({size} bytes of data) but the archive "
                          f"stores {info.file_size - header_bytes} bytes; refused")
    return tuple(shape), dtype, bool(fortran)


def _check_inflation(members: dict[str, zipfile.ZipInfo], file: Path) -> None:
    inflated = sum(info.file_size for info in members.values())
    packed = max(1, sum(info.compress_size for info in members.values()))
    if inflated > BOMB_BYTES and inflated > BOMB_RATIO * packed:
        raise FormatError(f"{file}: its arrays would inflate from {packed} to {inflated} bytes, more than "
                          f"{BOMB_RATIO}x (float weights barely compress); refused as a likely zip bomb")


def _data(archive: zipfile.ZipFile, info: zipfile.ZipInfo, header: Header, file: Path, name: str) -> np.ndarray:
    shape, dtype, fortran = header
    size = math.prod(shape) * dtype.itemsize
    with archive.open(info) as stream:
        stream.read(info.file_size - size)  # the .npy header, read and checked before
        data = stream.read(size)  # at most the declared size; zipfile checks the CRC at the end
        if len(data) != size:
            raise FormatError(f"{file} is truncated: array {name!r} holds {len(data)} of its {size} bytes")
        stream.read(1)  # reaching the end makes zipfile check the member's CRC
    array = np.frombuffer(data, dtype=dtype)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return array


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
