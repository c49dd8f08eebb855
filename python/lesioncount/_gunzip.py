"""One-shot gzip decompression through the fastest installed library: ISA-L, zlib-ng, else zlib.

``.nii.gz`` maps of segmentation networks hold float32 noise that compresses poorly (about 1.2:1),
and inflating them is most of the work of ``lesioncount count``. The libraries, fastest first
(measured in BENCHMARKS.md on the 20-case folder; every one releases the GIL while it inflates):

- ``isal`` (python-isal, Intel ISA-L's igzip; ``pip install isal``, in the ``[io]`` extra),
- ``zlib-ng`` (``pip install zlib-ng``, the ``zlib_ng`` module),
- ``zlib`` (the standard library; always there).

``"auto"`` (the default) takes the first one that imports. ``LESIONCOUNT_GZIP=isal|zlib-ng|zlib``
in the environment, or :func:`set_gzip_backend`, forces one. All give identical bytes:
:func:`gunzip` equals :func:`gzip.decompress` for every input, including files made of several gzip
members (``cat a.gz b.gz``, bgzip) and zero padding after the last member; truncated or corrupt
data raises (``EOFError``, ``gzip.BadGzipFile``, or the library's ``error``).
"""
from __future__ import annotations

import gzip
import importlib
import os
import threading
from types import ModuleType

__all__ = ["GZIP_BACKENDS", "gunzip", "gzip_backend", "set_gzip_backend"]

#: Backends in order of preference (``"auto"`` picks the first importable one).
GZIP_BACKENDS = ("isal", "zlib-ng", "zlib")
_MODULE_OF = {"isal": "isal.isal_zlib", "zlib-ng": "zlib_ng.zlib_ng", "zlib": "zlib"}
_PIP_NAME = {"isal": "isal", "zlib-ng": "zlib-ng", "zlib": "zlib"}
_ENV = "LESIONCOUNT_GZIP"
# later members are fed in steps of this many compressed bytes, so that a file of many small
# members (bgzip: 64 KiB blocks) costs O(n), not O(n^2) copies of the leftover input
_MEMBER_STEP = 1 << 20

_lock = threading.Lock()
_selected: tuple[str, ModuleType] | None = None


def _import_backend(name: str) -> ModuleType:
    return importlib.import_module(_MODULE_OF[name])


def _resolve(name: str, source: str) -> tuple[str, ModuleType]:
    if not isinstance(name, str) or name.lower() not in ("auto",) + GZIP_BACKENDS:
        raise ValueError(f"{source} must be one of 'auto', {', '.join(repr(b) for b in GZIP_BACKENDS)}; got {name!r}")
    name = name.lower()
    if name == "auto":
        for candidate in GZIP_BACKENDS:
            try:
                return candidate, _import_backend(candidate)
            except ImportError:
                continue
        raise AssertionError("unreachable: zlib is part of the standard library")  # pragma: no cover
    try:
        return name, _import_backend(name)
    except ImportError as exc:
        from ._extras import MissingExtraError

        from ._extras import install_hint

        raise MissingExtraError(f"{source}={name!r}: the {_PIP_NAME[name]} package is not installed: "
                                f"pip install {_PIP_NAME[name]} (or all of {install_hint('io')})") from exc


def set_gzip_backend(name: str = "auto") -> str:
    """Choose the library :func:`gunzip` uses; returns the name chosen.

    Args:
        name: ``"auto"`` (the first importable of ``"isal"``, ``"zlib-ng"``, ``"zlib"``) or one of
            them by name. Case-insensitive.

    Raises:
        ValueError: ``name`` is not one of these (the message names ``name``).
        MissingExtraError: the named library is not installed (an ``ImportError``).

    Example:
        >>> from lesioncount.io import set_gzip_backend, gzip_backend
        >>> set_gzip_backend("zlib")
        'zlib'
        >>> gzip_backend()
        'zlib'
        >>> _ = set_gzip_backend("auto")   # back to the fastest installed library
    """
    global _selected
    choice = _resolve(name, "name")
    with _lock:
        _selected = choice
    return choice[0]


def _current() -> tuple[str, ModuleType]:
    global _selected
    choice = _selected
    if choice is None:
        env = os.environ.get(_ENV, "auto").strip() or "auto"
        choice = _resolve(env, _ENV)
        with _lock:
            if _selected is None:
                _selected = choice
            choice = _selected
    return choice


def gzip_backend() -> str:
    """The name of the library :func:`gunzip` uses now: ``"isal"``, ``"zlib-ng"`` or ``"zlib"``.

    On first use it is ``$LESIONCOUNT_GZIP`` when set, else the fastest installed library.

    Example:
        >>> from lesioncount.io import gzip_backend
        >>> gzip_backend() in ("isal", "zlib-ng", "zlib")
        True
    """
    return _current()[0]


def gunzip(raw, backend: str | None = None) -> bytes:
    """Decompress a whole gzip file held in memory; the same bytes as :func:`gzip.decompress`.

    Each member is inflated by the selected library (``backend``, else :func:`gzip_backend`) in one
    GIL-free call that also checks the member's CRC-32 and length, so threads decompress in
    parallel.

    Args:
        raw: the compressed file, a bytes-like object (``bytes``, ``bytearray``, ``memoryview``).
        backend: ``None`` (the selected library) or ``"auto"``, ``"isal"``, ``"zlib-ng"``, ``"zlib"``.

    Returns:
        ``bytes``: the concatenated content of all members (``b""`` for empty input).

    Raises:
        EOFError: the data ends inside a member (truncated file).
        gzip.BadGzipFile: the data (or what follows a member, zero padding aside) is not gzip.
        ValueError: ``backend`` is not a known name.
        The library's ``error`` (a ``zlib.error`` analogue): corrupt deflate data or a CRC mismatch.

    Example:
        >>> import gzip
        >>> from lesioncount.io import gunzip
        >>> gunzip(gzip.compress(b"lesion") + gzip.compress(b"count"))
        b'lesioncount'
    """
    _, lib = _current() if backend is None else _resolve(backend, "backend")
    view = memoryview(raw).cast("B")
    size, pos, parts = len(view), 0, []
    while True:
        while pos < size and view[pos] == 0:  # gzip.decompress ignores zero padding between/after members
            pos += 1
        if pos >= size:
            break
        if size - pos < 2 or view[pos] != 0x1F or view[pos + 1] != 0x8B:
            raise gzip.BadGzipFile(f"Not a gzipped file ({bytes(view[pos:pos + 2])!r} at byte {pos})")
        inflater = lib.decompressobj(31)
        # the first member gets all the input at once (one call, no copies for a single-member
        # file); later ones get bounded steps, so unused_data never copies a long tail
        step = size - pos if not parts else _MEMBER_STEP
        while not inflater.eof:
            chunk = view[pos:pos + step]
            if not len(chunk):
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            parts.append(inflater.decompress(chunk))
            pos += len(chunk)
        pos -= len(inflater.unused_data)
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)
