"""A GGUF file's tensor table and metadata, read in milliseconds, with the tensor data memory-mapped.

The gguf package's reader parses every metadata array element in Python (a 49k-token vocabulary takes
seconds); loading quantized weights needs only the tensor table and a few scalars, so this reads the layout
itself (spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md, versions 2 and 3), skips arrays, and maps
the file once. Tensors come back as numpy views of the map: nothing is copied until a caller copies.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import kernels
from ..errors import ModelLoadError

# value type -> struct format of one scalar (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_KEEP_ARRAY = 256   # arrays up to this many elements are kept (per-layer lists); longer ones are skipped

# ggml type id -> (weights per block, bytes per block), for the types a tensor table may name
TYPE_SIZES = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
              9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
              15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]     # PyTorch order: outermost first ([rows, columns] for a matrix)
    offset: int                # from the start of the file

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = TYPE_SIZES[self.ggml_type]
        return int(np.prod(self.shape)) // per_block * block_bytes


class GGUFFile:
    """``GGUFFile(path)``: ``.metadata`` (scalars, strings and short arrays), ``.tensors`` (name ->
    TensorInfo) and ``.data(name)``, a read-only numpy view: uint8 rows of blocks [rows, row_bytes] for
    block-quantized types, the element type for float ones."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            self.metadata, self.tensors = self._parse(self._map)
        except (OSError, ValueError, struct.error, IndexError, UnicodeDecodeError, KeyError) as e:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    def _parse(self, buf: np.memmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        raw = memoryview(buf)
        if bytes(raw[:4]) != b"GGUF":
            raise ValueError("bad magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", raw, pos)
            s = bytes(raw[pos + 8:pos + 8 + n]).decode("utf-8")
            pos += 8 + n
            return s

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype in _SCALARS:
                fmt = _SCALARS[vtype]
                (v,) = struct.unpack_from(fmt, raw, pos)
                pos += struct.calcsize(fmt)
                return v
            if vtype == 8:
                return string()
            if vtype == 9:
                item_type, count = struct.unpack_from("<IQ", raw, pos)
                pos += 12
                if item_type in _SCALARS:
                    size = struct.calcsize(_SCALARS[item_type])
                    if count <= _KEEP_ARRAY:
                        items = list(struct.unpack_from("<" + _SCALARS[item_type][1] * count, raw, pos))
                        pos += size * count
                        return items
                    pos += size * count
                    return None
                if item_type == 8 and count > _KEEP_ARRAY and kernels.available():   # skip in C: no walk here
                    end = kernels.library().tq_skip_gguf_strings(buf.ctypes.data, len(buf), pos, count)
                    if end < 0:
                        raise ValueError("a string array runs past the end of the file")
                    pos = end
                    return None
                items = [value(item_type) for _ in range(count)]   # strings (or nested arrays): walk them
                return items if count <= _KEEP_ARRAY else None
            raise ValueError(f"unknown metadata value type {vtype}")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            v = value(vtype)
            if v is not None:
                metadata[key] = v
        infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", raw, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", raw, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            if ggml_type not in TYPE_SIZES:
                raise ValueError(f"tensor {name!r} has unknown type {ggml_type}")
            infos.append((name, ggml_type, tuple(int(d) for d in reversed(dims)), offset))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-pos // alignment) * alignment
        tensors = {}
        for name, ggml_type, shape, offset in infos:
            info = TensorInfo(name, ggml_type, shape, start + offset)
            if info.offset + info.nbytes > len(buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            tensors[name] = info
        return metadata, tensors

    def data(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        per_block, block_bytes = TYPE_SIZES[info.ggml_type]
        flat = self._map[info.offset:info.offset + info.nbytes]
        if per_block > 1:
            return flat.reshape(*info.shape[:-1], info.shape[-1] // per_block * block_bytes)
        dtype = {0: np.float32, 1: np.float16, 30: np.uint16}.get(info.ggml_type)
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has a type tachy does not read ({info.ggml_type})")
        return flat.view(dtype).reshape(info.shape)
