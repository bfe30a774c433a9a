"""``client_state`` without pickle: typed JSON in the manifest, tensors in a safetensors file.

[Note: client state]
DeepSpeed scripts put whatever they need to resume into ``client_state``: RNG states
(``torch.get_rng_state()``: a tensor; ``np.random.get_state()``: a tuple holding a uint32
array; ``random.getstate()``: nested tuples), tensors, numpy arrays, counters, nested dicts.
DeepSpeed pickles it; shardwise never writes a pickle. :func:`encode` turns the value into JSON
plus a set of tensors:

* ``None``, ``bool``, ``int``, ``float``, ``str``, ``list`` and ``dict`` with string keys are
  themselves (an ``int`` of more than 4000 digits, a NaN / infinite ``float`` are marked);
* everything else is a *marked* object ``{"__shardwise__": TYPE, ...}``: ``tuple``, ``dict``
  (non-string keys, or one that uses the marker key itself: as ``[key, value]`` pairs),
  ``OrderedDict``, ``set``, ``frozenset``, ``bytes``, ``bytearray``, ``complex``, ``torch.Size``,
  ``torch.dtype``, ``torch.device``, numpy scalars (``np.float32(1.5)``: dtype and raw bytes),
  ``tensor`` and ``ndarray``;
* a tensor (or ``nn.Parameter``) is stored in ``client_state.safetensors`` under ``t<N>``, in its
  own dtype when safetensors has it, else as raw bytes with its dtype recorded (complex,
  uint16/32/64, float8); a numpy array (any numeric, bool, string or datetime dtype, any byte
  order) as its raw bytes, with ``dtype.str`` and shape. The same tensor object reached twice is
  stored once and comes back as one object.

:func:`decode` rebuilds an equal structure: tuples as tuples (``random.setstate`` and
``np.random.set_state`` accept what comes back), tensors on the CPU with their dtype, shape and
``requires_grad``. Anything else (an arbitrary object, a dict subclass, a ``pathlib.Path``, an
object-dtype array, a structure that contains itself) is a :class:`CheckpointError` at save
naming its path (``client_state['opt'][2]``) and the fix, before anything is written.

The file is written by rank 0 into the temporary directory with the shard files and, like
them, checked at every load before use ([Note: format 4]): a regular file of the recorded size,
the header's crc32, a strict header parse (every entry's dtype, shape and byte range; nothing
missing, nothing extra against the manifest) and every tensor's crc32, which starts from the
tensor's identity (key, dtype, shape) so that entries swapped in the manifest fail too.
"""
from __future__ import annotations

import base64
import binascii
import collections
import json
import math
import os
import zlib
from typing import Any

import torch

from shardwise.checkpoint import manifest as M
from shardwise.checkpoint.files import open_regular, tensor_bytes, write_safetensors
from shardwise.checkpoint.reader import _FROM_ST, _TO_ST, parse_header
from shardwise.errors import CheckpointError

MARK = "__shardwise__"
MAX_DEPTH = 100
_BIG_INT_DIGITS = 4000  # Python refuses to print / parse ints of more than 4300 digits
_NP_KINDS = "biufcmMUS"  # bool, ints, floats, complex, timedelta, datetime, unicode, bytes
_NATIVE = set(_TO_ST)  # torch dtypes safetensors stores as such

_HOW = ("checkpoints store client_state without pickle: use tensors, numpy arrays, numbers, strings, bytes, "
        "None, lists, tuples, dicts, sets (or convert the value to one of them, e.g. obj.state_dict(), "
        "str(path)), or save it yourself next to the checkpoint")


def _np():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return np


def _identity(key: str, dtype: str, shape: list[int]) -> bytes:
    return json.dumps([key, dtype, shape], separators=(",", ":")).encode()


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: Any) -> torch.dtype | None:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.specs: dict[str, dict] = {}
        self._by_id: dict[int, str] = {}
        self._keep: list[Any] = []  # objects whose id() is memoised stay alive meanwhile
        self._path_ids: set[int] = set()

    def fail(self, path: str, why: str) -> CheckpointError:
        return CheckpointError(f"client_state{path} {why}; {_HOW}. Nothing was saved")

    def _store(self, key_of: Any, flat: torch.Tensor, spec: dict) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = flat
        self.specs[key] = {"dtype": _torch_dtype_name(flat.dtype), "shape": list(flat.shape)} | spec
        self._by_id[id(key_of)] = key
        self._keep.append(key_of)
        return key

    def tensor(self, t: torch.Tensor, path: str) -> dict:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise self.fail(path, f"is a {type(t).__module__}.{type(t).__qualname__} (a tensor subclass)")
        if t.layout != torch.strided or t.is_quantized or getattr(t, "is_nested", False) or t.device.type == "meta":
            raise self.fail(path, f"is a tensor that cannot be stored as plain bytes (layout {t.layout}, "
                            f"device {t.device}{', quantized' if t.is_quantized else ''}); store t.to_dense() "
                            "or a dequantized copy")
        out = {MARK: "tensor", "dtype": _torch_dtype_name(t.dtype), "shape": list(t.shape)}
        if t.requires_grad:
            out["requires_grad"] = True
        if isinstance(t, torch.nn.Parameter):
            out["parameter"] = True
        key = self._by_id.get(id(t))
        if key is None:
            v = t.detach().resolve_conj().resolve_neg().cpu().contiguous()
            if v.dtype in _NATIVE:
                key = self._store(t, v, {})
            else:  # complex, uint16/32/64, float8, ...: the raw bytes, dtype in the marker
                try:
                    raw = v.reshape(-1).view(torch.uint8)
                except RuntimeError as exc:
                    raise self.fail(path, f"is a tensor of dtype {t.dtype}, whose bytes cannot be read ({exc})")
                key = self._store(t, raw, {})
        out["key"] = key
        return out

    def ndarray(self, a, path: str) -> dict:
        np = _np()
        if type(a) is not np.ndarray:
            raise self.fail(path, f"is a {type(a).__module__}.{type(a).__qualname__} (an ndarray subclass); "
                            "store np.asarray(value)")
        if a.dtype.kind not in _NP_KINDS or a.dtype.hasobject or a.dtype.fields is not None:
            raise self.fail(path, f"is a numpy array of dtype {a.dtype} (object or structured); only numeric, "
                            "bool, string and datetime arrays are stored")
        key = self._by_id.get(id(a))
        if key is None:
            raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            key = self._store(a, torch.from_numpy(raw.copy()), {})
        return {MARK: "ndarray", "dtype": a.dtype.str, "shape": list(a.shape), "key": key}

    def value(self, x: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nests deeper than {MAX_DEPTH} levels")
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            if abs(x) >= 10 ** _BIG_INT_DIGITS:
                return {MARK: "int", "hex": hex(x)}
            return x
        if t is float:
            if math.isfinite(x):
                return x
            return {MARK: "float", "value": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(x, torch.Tensor):
            return self.tensor(x, path)
        np = _np()
        if np is not None:
            if isinstance(x, np.ndarray):
                return self.ndarray(x, path)
            if isinstance(x, np.generic):
                if x.dtype.kind not in _NP_KINDS:
                    raise self.fail(path, f"is a numpy scalar of dtype {x.dtype}")
                return {MARK: "np.scalar", "dtype": x.dtype.str, "b64": base64.b64encode(x.tobytes()).decode()}
        if t is complex:
            return {MARK: "complex", "real": self.value(x.real, path + ".real", depth + 1),
                    "imag": self.value(x.imag, path + ".imag", depth + 1)}
        if t in (bytes, bytearray):
            return {MARK: t.__name__, "b64": base64.b64encode(x).decode()}
        if isinstance(x, torch.dtype):
            return {MARK: "torch.dtype", "name": _torch_dtype_name(x)}
        if t is torch.device:
            return {MARK: "torch.device", "name": str(x)}
        if t in (list, tuple, torch.Size, set, frozenset, dict, collections.OrderedDict):
            if id(x) in self._path_ids:
                raise self.fail(path, "contains itself (a reference cycle)")
            self._path_ids.add(id(x))
            try:
                return self._container(x, t, path, depth)
            finally:
                self._path_ids.discard(id(x))
        what = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
        if isinstance(x, (dict, list, tuple, str, int, float)):
            base = next(b for b in (dict, list, tuple, str, int, float) if isinstance(x, b)).__name__
            raise self.fail(path, f"is a {what} (a subclass of {base}), which would come back as a plain {base}; "
                            f"store {base}(value)" + (" or value.value (an enum)" if base in ("int", "str") else ""))
        raise self.fail(path, f"is a {what}, which has no representation without pickle")

    def _container(self, x: Any, t: type, path: str, depth: int) -> Any:
        if t is list:
            return [self.value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]
        if t in (tuple, torch.Size):
            items = [self.value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]
            return {MARK: "tuple" if t is tuple else "torch.Size", "items": items}
        if t in (set, frozenset):
            return {MARK: t.__name__, "items": [self.value(v, f"{path}{{{v!r:.40}}}", depth + 1) for v in x]}
        plain = t is dict and all(type(k) is str for k in x) and MARK not in x
        if plain:
            return {k: self.value(v, f"{path}[{k!r}]", depth + 1) for k, v in x.items()}
        pairs = [[self.value(k, f"{path}<key {k!r:.40}>", depth + 1), self.value(v, f"{path}[{k!r}]", depth + 1)]
                 for k, v in x.items()]
        return {MARK: "dict" if t is dict else "OrderedDict", "items": pairs}


def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, dict]]:
    """``(json_doc, tensors, specs)`` for ``client_state`` (see [Note: client state]); an
    unrepresentable value is a :class:`CheckpointError` naming its path."""
    enc = _Encoder()
    doc = enc.value({} if value is None else value, "")
    try:  # what the manifest writer will do with it (allow_nan=False: nothing non-standard is left)
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - encode covers every type
        raise enc.fail("", f"cannot be written as JSON ({exc})") from None
    return doc, enc.tensors, enc.specs


def write_file(directory: str, tensors: dict[str, torch.Tensor], specs: dict[str, dict]) -> dict | None:
    """Write ``tensors`` as ``<directory>/client_state.safetensors`` (fsynced); returns the
    manifest's ``client_tensors`` entry, or None (no file) when there are none."""
    if not tensors:
        return None
    seeds = {k: _identity(k, specs[k]["dtype"], specs[k]["shape"]) for k in tensors}
    info = write_safetensors(os.path.join(directory, M.CLIENT_FILE), tensors, 0,
                             {"format": M.FORMAT, "content": "client_state"}, seeds)
    crcs = info.pop("tensors")
    return {"file": M.CLIENT_FILE, **info,
            "tensors": {k: {"dtype": specs[k]["dtype"], "shape": specs[k]["shape"], "crc32": crcs[k]} for k in tensors}}


def read_file(ckpt_path: str, entry: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the client-state file, verified against the manifest's ``client_tensors``
    ``entry`` (size, header crc32, strict header, each tensor's dtype, shape and crc32)."""
    path = os.path.join(ckpt_path, entry["file"])
    with open_regular(path, f"client-state file (expected {entry['size']} bytes)") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry["size"]:
            raise CheckpointError(f"client-state file {path} has {size} bytes, expected {entry['size']}: the file "
                                  f"is {'truncated' if size < entry['size'] else 'longer than written'}")
        head = f.read(entry["header_bytes"])
        if len(head) != entry["header_bytes"] or zlib.crc32(head) & 0xFFFFFFFF != entry["header_crc32"]:
            raise CheckpointError(f"checksum mismatch in the header of client-state file {path}: the file is "
                                  "corrupt (a bit flipped on disk, or it was modified)")
        header = parse_header(head, path, size - entry["header_bytes"])
        want = entry["tensors"]
        if set(header) != set(want):
            raise CheckpointError(f"client-state file {path} holds {sorted(header)[:6]}, the manifest lists "
                                  f"{sorted(want)[:6]}: the file and the manifest disagree")
        out = {}
        for key, spec in want.items():
            st, shape, a, b = header[key]
            dtype = _torch_dtype(spec["dtype"])
            if dtype not in _TO_ST or _TO_ST[dtype] != st or shape != spec["shape"]:
                raise CheckpointError(f"tensor {key!r} in client-state file {path} is {st} of shape {shape}, the "
                                      f"manifest says {spec['dtype']} of shape {spec['shape']}: the file and the "
                                      "manifest disagree")
            t = torch.empty(shape, dtype=_FROM_ST[st])
            f.seek(entry["header_bytes"] + a)
            if b > a and f.readinto(tensor_bytes(t)) != b - a:
                raise CheckpointError(f"client-state file {path} ended inside tensor {key!r}: it is truncated")
            seed = _identity(key, spec["dtype"], spec["shape"])
            if zlib.crc32(tensor_bytes(t), zlib.crc32(seed)) & 0xFFFFFFFF != spec["crc32"]:
                raise CheckpointError(f"checksum mismatch for tensor {key!r} in client-state file {path}: the file "
                                      "is corrupt, or the manifest names the wrong entry")
            out[key] = t
    return out


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.tensors = tensors
        self.where = where
        self._made: dict[tuple, Any] = {}  # one object per stored tensor (and per way it is viewed)

    def bad(self, path: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: client_state{path} {why}: the manifest is corrupt or was edited. "
                               "Load another checkpoint (tag=...)")

    def _raw(self, doc: dict, path: str) -> torch.Tensor:
        key = doc.get("key")
        if not isinstance(key, str) or key not in self.tensors:
            raise self.bad(path, f"names tensor {key!r}, which the client-state file does not hold")
        return self.tensors[key]

    def tensor(self, doc: dict, path: str) -> torch.Tensor:
        raw = self._raw(doc, path)
        dtype, shape = _torch_dtype(doc.get("dtype")), doc.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self.bad(path, f"is a tensor marker with dtype {doc.get('dtype')!r} and shape {shape!r}")
        memo = ("tensor", doc["key"], str(dtype), tuple(shape), bool(doc.get("requires_grad")),
                bool(doc.get("parameter")))
        if memo in self._made:
            return self._made[memo]
        if raw.dtype == dtype:
            t = raw.clone()
        elif raw.dtype == torch.uint8 and dtype not in _NATIVE:
            t = raw.clone().view(dtype)
        else:
            raise self.bad(path, f"says dtype {dtype}, the file holds {raw.dtype}")
        if t.numel() != math.prod(shape):
            raise self.bad(path, f"says shape {shape}, the file holds {t.numel()} elements")
        t = t.reshape(shape)
        if doc.get("parameter"):
            t = torch.nn.Parameter(t, requires_grad=bool(doc.get("requires_grad")))
        elif doc.get("requires_grad"):
            if not (t.is_floating_point() or t.is_complex()):
                raise self.bad(path, f"asks for requires_grad on a {dtype} tensor")
            t.requires_grad_(True)
        self._made[memo] = t
        return t

    def ndarray(self, doc: dict, path: str):
        np = _np()
        raw = self._raw(doc, path)
        shape = doc.get("shape")
        try:
            dtype = np.dtype(doc.get("dtype"))
        except (TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in _NP_KINDS or dtype.fields is not None or not isinstance(shape, list) \
                or not all(type(d) is int and d >= 0 for d in shape) or raw.dtype != torch.uint8:
            raise self.bad(path, f"is an ndarray marker with dtype {doc.get('dtype')!r} and shape {shape!r}")
        memo = ("ndarray", doc["key"], dtype.str, tuple(shape))
        if memo in self._made:
            return self._made[memo]
        data = raw.numpy().tobytes()
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise self.bad(path, f"says {dtype} of shape {shape}, the file holds {len(data)} bytes")
        a = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        self._made[memo] = a
        return a

    def value(self, x: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH + 2:
            raise self.bad(path, f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(x, list):
            return [self.value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]
        if not isinstance(x, dict):
            return x
        if MARK not in x:
            return {k: self.value(v, f"{path}[{k!r}]", depth + 1) for k, v in x.items()}
        kind = x[MARK]
        try:
            return self._marked(kind, x, path, depth)
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RuntimeError, binascii.Error,
                RecursionError) as exc:
            raise self.bad(path, f"is a malformed {kind!r} marker ({type(exc).__name__}: {exc})") from None

    def _items(self, x: dict, path: str, depth: int) -> list:
        items = x["items"]
        if not isinstance(items, list):
            raise self.bad(path, "has items that are not a list")
        return [self.value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(items)]

    def _marked(self, kind: Any, x: dict, path: str, depth: int) -> Any:
        if kind == "tuple":
            return tuple(self._items(x, path, depth))
        if kind == "torch.Size":
            return torch.Size(self._items(x, path, depth))
        if kind in ("set", "frozenset"):
            return (set if kind == "set" else frozenset)(self._items(x, path, depth))
        if kind in ("dict", "OrderedDict"):
            out = {} if kind == "dict" else collections.OrderedDict()
            for i, pair in enumerate(x["items"]):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise self.bad(f"{path}[{i}]", "is not a [key, value] pair")
                key = self.value(pair[0], f"{path}<key {i}>", depth + 1)
                out[key] = self.value(pair[1], f"{path}[{key!r:.40}]", depth + 1)
            return out
        if kind == "tensor":
            return self.tensor(x, path)
        if kind == "ndarray":
            return self.ndarray(x, path)
        if kind in ("bytes", "bytearray"):
            data = base64.b64decode(x["b64"], validate=True)
            return data if kind == "bytes" else bytearray(data)
        if kind == "float":
            value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(x["value"])
            if value is None:
                raise self.bad(path, f"is a float marker of {x['value']!r}")
            return value
        if kind == "int":
            return int(x["hex"], 16)
        if kind == "complex":
            real, imag = (self.value(x[k], f"{path}.{k}", depth + 1) for k in ("real", "imag"))
            if type(real) is not float or type(imag) is not float:
                raise self.bad(path, "is a complex marker whose parts are not floats")
            return complex(real, imag)
        if kind == "np.scalar":
            np = _np()
            dtype = np.dtype(x["dtype"])
            data = base64.b64decode(x["b64"], validate=True)
            if dtype.kind not in _NP_KINDS or dtype.fields is not None or len(data) != dtype.itemsize:
                raise self.bad(path, f"is a numpy scalar marker of {dtype} with {len(data)} bytes")
            return np.frombuffer(data, dtype=dtype)[0]
        if kind == "torch.dtype":
            dtype = _torch_dtype(x["name"])
            if dtype is None:
                raise self.bad(path, f"names dtype {x['name']!r}, which this torch does not have")
            return dtype
        if kind == "torch.device":
            return torch.device(x["name"])
        raise self.bad(path, f"is marked {kind!r}, which this shardwise does not know")


def decode(doc: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The client state that :func:`encode` saw, rebuilt from ``doc`` and the file's
    ``tensors``; a malformed document is a :class:`CheckpointError` naming ``where`` and the path."""
    return _Decoder(tensors, where).value(doc, "")


def load(ckpt_path: str, manifest: dict) -> Any:
    """The checkpoint's client state: format 4 decoded (its tensors read and verified), earlier
    formats' plain JSON as stored."""
    if manifest["format_version"] < 4:
        return manifest["client_state"]
    entry = manifest.get("client_tensors")
    tensors = read_file(ckpt_path, entry) if entry is not None else {}
    return decode(manifest["client_state"], tensors, os.path.join(ckpt_path, M.MANIFEST))


__all__ = ["MARK", "encode", "decode", "write_file", "read_file", "load"]
