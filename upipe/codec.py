"""What you put is what you get: how each payload type travels through a slot or a chunk.

Every item is (kind, meta, payload bytes). ``meta`` is small (it rides in the slot) and says how to
rebuild the object; the payload is either inline in the slot or in a chunk. Pure Python: no ffi.

========== ================================ =================================================
kind       put                              get
========== ================================ =================================================
BYTES      ``bytes``                        ``bytes`` (a copy)
BYTEARRAY  ``bytearray``                    ``bytearray`` (a copy)
MEMORYVIEW ``memoryview`` (any format)      read-only ``memoryview``, same format and shape;
                                            a view into shared memory for a chunk item
NDARRAY    ``numpy.ndarray`` (plain dtype)  read-only ``ndarray``, same dtype and shape; a view
                                            into shared memory for a chunk item
PICKLE     anything else picklable          the unpickled object; pickle protocol 5 with large
                                            buffers (numpy arrays inside) out of band, so those
                                            arrive as views into shared memory too
========== ================================ =================================================
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np  # imported when an item is an ndarray (or becomes one): not for bytes

KIND_BYTES = 1
KIND_BYTEARRAY = 2
KIND_MEMORYVIEW = 3
KIND_NDARRAY = 4
KIND_PICKLE = 5

#: Out-of-band pickle buffers per item; past this they go in-band (the table rides in the slot).
MAX_OOB_BUFFERS = 8
#: Buffers smaller than this stay in-band: out of band only pays for large ones.
OOB_MIN_BYTES = 1024

_Q = struct.Struct("<Q")


def encode_shape(fmt: str, shape: tuple[int, ...]) -> bytes:
    f = fmt.encode()
    return bytes((len(shape), len(f))) + f + struct.pack(f"<{len(shape)}Q", *shape)


def decode_shape(meta: bytes) -> tuple[str, tuple[int, ...]]:
    ndim, flen = meta[0], meta[1]
    fmt = meta[2 : 2 + flen].decode()
    shape = struct.unpack_from(f"<{ndim}Q", meta, 2 + flen)
    return fmt, shape


def plain_dtype(dtype: np.dtype[Any]) -> bool:
    """A dtype that ``dtype.str`` describes completely (no fields, no objects)."""
    return dtype.fields is None and not dtype.hasobject and dtype.subdtype is None


class Encoded:
    """An item ready to write: kind, meta and its payload as a list of buffers."""

    __slots__ = ("kind", "meta", "parts", "nbytes")

    def __init__(self, kind: int, meta: bytes, parts: list[Any], nbytes: int) -> None:
        self.kind = kind
        self.meta = meta
        self.parts = parts
        self.nbytes = nbytes

    def joined(self) -> Any:
        """The payload as one buffer (copies only when there are several parts)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return b"".join(bytes(p) if not isinstance(p, bytes) else p for p in self.parts)


def encode(obj: Any, meta_max: int) -> Encoded:
    """Describe obj for the queue. ``meta_max`` is how much metadata a slot can carry."""
    cls = obj.__class__
    if cls is bytes:
        return Encoded(KIND_BYTES, b"", [obj], len(obj))
    if cls is bytearray:
        return Encoded(KIND_BYTEARRAY, b"", [obj], len(obj))
    if cls is memoryview:
        view = obj if obj.c_contiguous else memoryview(obj.tobytes()).cast(obj.format, obj.shape)
        meta = b"" if (view.format == "B" and view.ndim == 1) else encode_shape(view.format,
                                                                                 view.shape or ())
        if len(meta) <= meta_max:
            flat = view.cast("B") if view.ndim != 1 or view.format != "B" else view
            return Encoded(KIND_MEMORYVIEW, meta, [flat], view.nbytes)
    elif cls is getattr(sys.modules.get("numpy"), "ndarray", None) and plain_dtype(obj.dtype):
        np = sys.modules["numpy"]  # upipe does not import numpy: without it, no ndarray exists
        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        meta = encode_shape(arr.dtype.str, arr.shape)
        if len(meta) <= meta_max:
            return Encoded(KIND_NDARRAY, meta, [arr.reshape(-1).view(np.uint8)], arr.nbytes)
    return encode_pickle(obj, meta_max)


def encode_pickle(obj: Any, meta_max: int) -> Encoded:
    buffers: list[pickle.PickleBuffer] = []
    limit = min(MAX_OOB_BUFFERS, max(0, (meta_max - 2) // 8))

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if len(buffers) >= limit or buf.raw().nbytes < OOB_MIN_BYTES:
            return True  # in-band
        buffers.append(buf)
        return False

    try:
        stream = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"cannot put a {type(obj).__name__}: it is not bytes-like, not a numpy array and "
            f"cannot be pickled ({exc}); put bytes, arrays or picklable objects"
        ) from exc
    raws = [b.raw() for b in buffers]
    meta = struct.pack(f"<H{len(raws) + 1}Q", len(raws), len(stream), *(r.nbytes for r in raws))
    return Encoded(KIND_PICKLE, meta, [stream, *raws], len(stream) + sum(r.nbytes for r in raws))


def decode(kind: int, meta: bytes, payload: Any) -> Any:
    """Rebuild the object from what a get returned (payload: bytes or a read-only memoryview)."""
    if kind == KIND_BYTES:
        return payload if payload.__class__ is bytes else bytes(payload)
    if kind == KIND_BYTEARRAY:
        return bytearray(payload)
    if kind == KIND_MEMORYVIEW:
        view = memoryview(payload).toreadonly()
        if meta:
            fmt, shape = decode_shape(meta)
            cast: Any = view.cast  # typeshed types cast() by literal format; ours is data
            return cast(fmt, shape) if shape else cast(fmt)
        return view
    if kind == KIND_NDARRAY:
        import numpy as np

        fmt, shape = decode_shape(meta)
        arr = np.frombuffer(payload, dtype=np.dtype(fmt)).reshape(shape)
        arr.flags.writeable = False
        return arr
    if kind == KIND_PICKLE:
        nbuf = struct.unpack_from("<H", meta)[0]
        lengths = struct.unpack_from(f"<{nbuf + 1}Q", meta, 2)
        view = memoryview(payload)
        stream = view[: lengths[0]]
        offset = lengths[0]
        bufs = []
        for n in lengths[1:]:
            bufs.append(view[offset : offset + n])
            offset += n
        return pickle.loads(stream, buffers=bufs)
    raise ValueError(f"unknown item kind {kind}: the queue holds data from another upipe version")
