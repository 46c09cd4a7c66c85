"""JPEG 2000 decoded at a reduced resolution level, with several threads (OpenJPEG via ctypes).

A JPEG 2000 codestream holds its image as a wavelet pyramid: decoding at level r stops the
inverse transform r steps early and skips the code blocks of the discarded sub-bands, giving
the image at 1/2^r of its size in about 1/4^r of the time. pylibjpeg-openjpeg and imagecodecs
expose neither the level nor OpenJPEG's thread pool, so this module calls the OpenJPEG 2.x
library (Debian's libopenjp2.so.7, else the copy Pillow's wheel bundles) through its stable C API.
Anything it cannot do exactly (colour, Part 2, precision or sign not as the header says) returns
None and the caller decodes full size with pydicom.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# JPEG 2000 (Part 1) and HTJ2K transfer syntaxes that OpenJPEG >= 2.5 decodes as one component.
J2K_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}

_OPJ_CODEC_J2K = 0
_DPARAMETERS_BYTES = 1 << 15  # opj_dparameters_t is ~8.3 KB (two 4096-byte paths); over-allocated

_u32 = ctypes.c_uint32


class _ImageComp(ctypes.Structure):
    _fields_ = [
        *(
            (name, _u32)
            for name in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd", "resno_decoded", "factor")
        ),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):
    _fields_ = [
        ("x0", _u32),
        ("y0", _u32),
        ("x1", _u32),
        ("y1", _u32),
        ("numcomps", _u32),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_ImageComp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", _u32),
    ]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MSG = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_quiet = _MSG(lambda msg, data: None)  # OpenJPEG prints errors on stderr unless given a handler

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _candidates() -> list[str]:
    found = ctypes.util.find_library("openjp2")
    names = [found] if found else []
    names.append("libopenjp2.so.7")
    try:
        # start-up time: PIL loads only when this runs
        import PIL

        names += sorted(glob.glob(str(Path(PIL.__file__).parent.parent / "pillow.libs" / "libopenjp2*")))
    except ImportError:
        pass
    return names


def library() -> ctypes.CDLL | None:
    """The OpenJPEG 2.x library with its prototypes set, or None (reason in unavailable_reason())."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        for name in _candidates():
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.opj_version.restype = ctypes.c_char_p
            version = lib.opj_version().decode()
            if tuple(int(x) for x in version.split(".")[:2]) < (2, 3):
                continue
            _prototypes(lib)
            _lib = lib
            log.debug("JPEG 2000 reduced decode with OpenJPEG %s (%s)", version, name)
            return _lib
        _lib_error = "no OpenJPEG >= 2.3 library (libopenjp2) found"
        return None


def unavailable_reason() -> str | None:
    """Why reduced decoding is off, or None when the library loaded."""
    return None if library() is not None else _lib_error


def _prototypes(lib: ctypes.CDLL) -> None:
    vp, b = ctypes.c_void_p, ctypes.c_int
    lib.opj_create_decompress.restype = vp
    lib.opj_create_decompress.argtypes = [ctypes.c_int]
    lib.opj_set_default_decoder_parameters.argtypes = [vp]
    lib.opj_setup_decoder.argtypes, lib.opj_setup_decoder.restype = [vp, vp], b
    lib.opj_codec_set_threads.argtypes, lib.opj_codec_set_threads.restype = [vp, ctypes.c_int], b
    for name in ("opj_set_info_handler", "opj_set_warning_handler", "opj_set_error_handler"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [vp, _MSG, vp], b
    lib.opj_stream_create.argtypes, lib.opj_stream_create.restype = [ctypes.c_size_t, b], vp
    lib.opj_stream_set_read_function.argtypes = [vp, _READ]
    lib.opj_stream_set_skip_function.argtypes = [vp, _SKIP]
    lib.opj_stream_set_seek_function.argtypes = [vp, _SEEK]
    lib.opj_stream_set_user_data_length.argtypes = [vp, ctypes.c_uint64]
    lib.opj_read_header.argtypes, lib.opj_read_header.restype = [vp, vp, ctypes.POINTER(ctypes.POINTER(_Image))], b
    lib.opj_decode.argtypes, lib.opj_decode.restype = [vp, vp, ctypes.POINTER(_Image)], b
    lib.opj_end_decompress.argtypes, lib.opj_end_decompress.restype = [vp, vp], b
    lib.opj_image_destroy.argtypes = [ctypes.POINTER(_Image)]
    lib.opj_stream_destroy.argtypes = [vp]
    lib.opj_destroy_codec.argtypes = [vp]


def codestream(data: bytes) -> bytes | None:
    """The raw J2K codestream of a DICOM frame (a JP2 wrapper, which some writers add, is dropped)."""
    start = data.find(b"\xff\x4f\xff\x51")
    return data[start:] if start >= 0 else None


def decomposition_levels(cs: bytes) -> int:
    """Number of wavelet decompositions in the main header's COD marker (0 when not found)."""
    i = 2  # after SOC
    while i + 4 <= len(cs):
        marker = int.from_bytes(cs[i : i + 2], "big")
        if marker == 0xFF90:  # SOT: main header over
            return 0
        length = int.from_bytes(cs[i + 2 : i + 4], "big")
        if marker == 0xFF52 and i + 9 < len(cs):  # COD: Lcod, Scod, SGcod (4 bytes), then SPcod levels
            return cs[i + 9]
        i += 2 + length
    return 0


def default_threads() -> int:
    """Decoder threads when the config says 0: every core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def decode(cs: bytes, level: int, threads: int) -> tuple[np.ndarray, int, bool] | None:
    """(int32 HxW array at 1/2^level size, precision, signed) of a one-component codestream, or None."""
    lib = library()
    if lib is None:
        return None
    pos = 0

    def read(buf: int, n: int, _: int) -> int:
        nonlocal pos
        if pos >= len(cs):
            return ctypes.c_size_t(-1).value
        chunk = cs[pos : pos + n]
        ctypes.memmove(buf, chunk, len(chunk))
        pos += len(chunk)
        return len(chunk)

    def skip(n: int, _: int) -> int:
        nonlocal pos
        n = max(-pos, min(n, len(cs) - pos))
        pos += n
        return n

    def seek(n: int, _: int) -> int:
        nonlocal pos
        if not 0 <= n <= len(cs):
            return 0
        pos = n
        return 1

    callbacks = (_READ(read), _SKIP(skip), _SEEK(seek))  # referenced until the stream is destroyed
    params = ctypes.create_string_buffer(_DPARAMETERS_BYTES)
    lib.opj_set_default_decoder_parameters(params)
    ctypes.c_uint32.from_buffer(params).value = level  # cp_reduce, the struct's first member
    codec = lib.opj_create_decompress(_OPJ_CODEC_J2K)
    stream = lib.opj_stream_create(1 << 20, 1)
    image = ctypes.POINTER(_Image)()
    try:
        for name in ("opj_set_info_handler", "opj_set_warning_handler", "opj_set_error_handler"):
            getattr(lib, name)(codec, _quiet, None)
        lib.opj_stream_set_read_function(stream, callbacks[0])
        lib.opj_stream_set_skip_function(stream, callbacks[1])
        lib.opj_stream_set_seek_function(stream, callbacks[2])
        lib.opj_stream_set_user_data_length(stream, len(cs))
        if not lib.opj_setup_decoder(codec, params):
            return None
        if threads > 1:
            lib.opj_codec_set_threads(codec, threads)
        if not lib.opj_read_header(stream, codec, ctypes.byref(image)) or image.contents.numcomps != 1:
            return None
        if not lib.opj_decode(codec, stream, image) or not lib.opj_end_decompress(codec, stream):
            return None
        comp = image.contents.comps[0]
        if not comp.data or comp.factor != level:
            return None
        h, w = int(comp.h), int(comp.w)
        out = np.ctypeslib.as_array(comp.data, shape=(h, w)).copy()
        return out, int(comp.prec), bool(comp.sgnd)
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_stream_destroy(stream)
        lib.opj_destroy_codec(codec)
