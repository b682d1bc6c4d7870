"""CPU kernels that read GGUF's quantized blocks directly (gguf_kernels.c) and run a whole decoder forward
(decoder.c, driven by tachy/models/cpu_forward.py), compiled for this machine.

The C sources are compiled once per machine with the system's C compiler (``-march=native``: the CPU decides
which instructions are used) into ``<tachy cache>/kernels/<hash>/``, keyed by the source, the compiler and
the CPU's flags, and loaded with ctypes; a compile takes about a second. Where no compiler is found, or
``TACHY_KERNELS=0``, ``available()`` is False and callers fall back to PyTorch (dequantized weights).

    y = matmul(x, weight)            # x bf16 [T, K], weight a QuantWeight [N, K] -> y [T, N]
    w = dequantize(weight, dtype)    # [N, K] float32 (bit-exact with the gguf package) or bfloat16

Row invariance: ``matmul`` computes each output row with the same operations whatever T and the thread
count (see the C file), which speculative decoding's exactness relies on.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from ..registry import cache_root

SOURCES = [Path(__file__).with_name(n) for n in ("pool.c", "gguf_kernels.c", "q8_matmul.c", "decoder.c", "rows.c")]
HEADER = Path(__file__).with_name("kernels.h")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-std=gnu11"]

# ggml type ids the kernels read (gguf.GGMLQuantizationType values)
FORMATS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
           "Q6_K": 14, "BF16": 30}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
BLOCK = {0: 32, 1: 32, 30: 32, 2: 32, 3: 32, 6: 32, 7: 32, 8: 32, 12: 256, 13: 256, 14: 256}
BLOCK_BYTES = {0: 128, 1: 64, 30: 64, 2: 18, 3: 20, 6: 22, 7: 24, 8: 34, 12: 144, 13: 176, 14: 210}


def row_bytes(fmt: int, K: int) -> int:
    return K // BLOCK[fmt] * BLOCK_BYTES[fmt]


@dataclass
class QuantWeight:
    """A weight matrix [N, K] kept in a GGUF block format: ``data`` is uint8 [N, row_bytes], row n holding
    output feature n's K weights (GGUF rows are independent, so rows can be sliced, reordered and stacked)."""

    fmt: int
    data: Tensor
    K: int
    packed: Tensor | None = None    # the same weights repacked 16 rows at a time for the int8 kernels (pack())

    def __post_init__(self) -> None:
        if self.fmt not in BLOCK:
            raise InvalidArgumentError(f"unsupported GGUF block format {self.fmt}")
        if self.K % BLOCK[self.fmt] or self.data.dtype != torch.uint8 or self.data.dim() != 2 \
                or self.data.shape[1] != row_bytes(self.fmt, self.K):
            raise InvalidArgumentError(f"{self.format}: {tuple(self.data.shape)} bytes do not hold rows of "
                                       f"{self.K} weights")

    @property
    def N(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    @property
    def format(self) -> str:
        return FORMAT_NAMES[self.fmt]

    @property
    def nbytes(self) -> int:
        return self.data.numel()


# ---- building and loading -------------------------------------------------------------------------------------
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


def machine_key() -> str:
    """A hash of the kernels' sources, flags, compiler and CPU: what the compiled library (and anything
    measured with it, like Engine.step_costs) depends on."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    texts = [p.read_text() for p in (*SOURCES, HEADER)]
    return hashlib.sha256("\0".join([*texts, " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()[:16]


def compile_library(sources: list[Path], out: Path) -> None:
    """Compile kernel sources into the shared library ``out`` with this machine's flags (raises on failure)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    done = subprocess.run([cc, *FLAGS, "-o", str(out), *map(str, sources)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling tachy's kernels failed:\n{done.stderr[-2000:]}")


def build(verbose: bool = False) -> Path:
    """Compile the kernels for this machine (once; later calls find the cached library)."""
    folder = cache_root() / "kernels" / machine_key()
    lib = folder / "libtachy_kernels.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}.so"
    start = time.perf_counter()   # ~10 s on 2 cores: say so, or a first run looks stuck
    print(f"tachy: compiling the CPU kernels for this machine (once; cached in {folder}) ...", file=sys.stderr,
          flush=True)
    try:
        compile_library(SOURCES, tmp)
        os.replace(tmp, lib)   # atomic: concurrent builders (test workers) each install a whole library
    finally:
        tmp.unlink(missing_ok=True)
    print(f"tachy: kernels compiled in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    if os.environ.get("TACHY_KERNELS", "1") == "0":
        _failed = "disabled by TACHY_KERNELS=0"
        return None
    try:
        lib = open_library(build())
    except (OSError, RuntimeError) as e:
        _failed = str(e)
        return None
    _lib = lib
    return lib


def open_library(path: Path) -> ctypes.CDLL:
    """A compiled kernel library with its functions' argument types declared and AMX switched as TACHY_AMX
    says (the package's own library, or another build that benchmarks/kernel_ab.py compares)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.tq_matmul.argtypes = [i32, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i32]
    lib.tq_matmul_portable.argtypes = lib.tq_matmul.argtypes
    lib.tq_packable.argtypes = [i32, i64, i64]
    lib.tq_packed_bytes.argtypes = [i32, i64, i64]
    lib.tq_packed_bytes.restype = i64
    lib.tq_pack.argtypes = [i32, ptr, i64, i64, i64, ptr]
    lib.tq_matmul_packed_bf16.argtypes = [i32, ptr, i64, i64, ptr, i64, i64, ptr, i64, i32, i32]
    lib.tq_dequantize.argtypes = [i32, ptr, i64, i64, i64, ptr, ptr, i32, i32]
    lib.tq_set_threads.argtypes = [i32]
    lib.tq_forward.argtypes = [ptr, ptr, ptr]
    lib.tq_forward_sparse.argtypes = [ptr, ptr, ptr, ptr]
    lib.tq_page_bounds.argtypes = [ptr, ptr, i64, i64, ptr]
    lib.tq_label_scores.argtypes = [ptr, ptr, i64, i64, ptr]
    lib.tq_write_labels.argtypes = [ptr, i64, i64, ptr]
    lib.tq_mark_top.argtypes = [ptr, i64, i64, ptr]
    lib.tq_label_top.argtypes = [ptr, ptr, i64, i64, i64, ptr]
    lib.tq_label_top.restype = i64
    lib.tq_profile.argtypes = [ptr, i32]
    if hasattr(lib, "tq_horizontal_sums"):   # AVX-512 builds only
        lib.tq_horizontal_sums.argtypes = [ptr, i64, ptr, ptr]
        lib.tq_attention_scores.argtypes = [ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ptr, i32]
        lib.tq_attention_values.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, i32]
    lib.key = path.parent.name   # the machine key
    lib.tq_skip_gguf_strings.argtypes = [ptr, i64, i64, i64]
    lib.tq_skip_gguf_strings.restype = i64
    lib.tq_argmax_rows.argtypes = [ptr, i64, i64, i64, ptr]
    lib.tq_topk_rows.argtypes = [ptr, i64, i64, i64, i64, ptr]
    lib.tq_set_amx.argtypes = [i32]
    lib.amx = bool(lib.tq_set_amx(int(os.environ.get("TACHY_AMX", "1") != "0")))
    return lib


def amx_used() -> bool:
    """Whether the kernels use AMX tiles now (see use_amx)."""
    lib = _load()
    return lib is not None and lib.amx


def use_amx(on: bool) -> bool:
    """Use AMX tiles where the CPU has them (the default; ``TACHY_AMX=0`` turns it off): attention scores and
    value sums, and the int8 products of 16 or more rows; returns whether they are used. Attention differs in
    its last bits between the two, so switch only between whole generations (tests compare both)."""
    lib = _load()
    if lib is None:
        return False
    lib.amx = bool(lib.tq_set_amx(int(on)))
    return lib.amx


def available() -> bool:
    """True when the compiled kernels are loaded (CPU tensors only)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _failed


def has_avx512_bf16() -> bool:
    return simd() == "avx512"


def simd() -> str:
    """The vector instructions the kernels were built with here: "avx512" (with BF16 and VNNI: every kernel),
    "avx2" (with FMA and F16C: the int8 products of GGUF blocks and the decoder's float work; bf16 weights
    take the portable path) or "portable" (plain C), or "" where the kernels are not loaded."""
    lib = _load()
    if lib is None:
        return ""
    return {512: "avx512", 256: "avx2"}.get(lib.tq_simd_width(), "portable")


def runs_gguf_natively() -> bool:
    """Whether the C forward over GGUF blocks beats dequantized PyTorch weights here: vector kernels (AVX-512 or
    AVX2) on a CPU; plain C loses to PyTorch's own kernels."""
    return simd() in ("avx512", "avx2")


_pinned_threads: int | None = None


def set_threads(n: int | None) -> None:
    """Pin the threads the kernels split their work over (results do not depend on it); None (the default)
    follows ``torch.get_num_threads()`` at each call, so ``torch.set_num_threads`` governs both."""
    global _pinned_threads
    _pinned_threads = None if n is None else int(n)
    lib = _load()
    if lib is not None and n is not None:
        lib.tq_set_threads(int(n))


@contextmanager
def threads_to_kernels(on: bool = True) -> Iterator[None]:
    """Inside: the kernels take PyTorch's threads and PyTorch runs on one thread. Both thread pools spin a
    while after each job; a decode step alternates kernels with small PyTorch ops (argmax, top-k over the
    vocabulary), and on a 2-core CPU each pool's spinning slowed the other (measured: speculative steps of
    the C forward took twice as long). ``torch.set_num_threads`` costs about 0.1 us, so this wraps each step.
    With ``on`` False (work the kernels take no part in), or where the kernels are not loaded, nothing changes:
    PyTorch keeps its threads."""
    n = torch.get_num_threads()
    if not on or n == 1 or _pinned_threads is not None or not available():
        yield
        return
    set_threads(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        set_threads(None)


def sync_threads(lib: ctypes.CDLL) -> None:
    """Before a call: the pinned thread count, or PyTorch's current one."""
    lib.tq_set_threads(_pinned_threads if _pinned_threads is not None else torch.get_num_threads())


def get_threads() -> int:
    lib = _load()
    return lib.tq_get_threads() if lib is not None else 1


# ---- operations ------------------------------------------------------------------------------------------------
def library() -> ctypes.CDLL:
    """The loaded library (raises when it is not available)."""
    return _lib_or_raise()


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"tachy's CPU kernels are not available: {_failed}")
    sync_threads(lib)
    return lib


def pack(w: QuantWeight) -> QuantWeight:
    """``w`` with its rows also repacked for the int8 kernels (q8_matmul.c), where its format and shape allow
    (quantized formats, a multiple of 16 rows); then ``matmul`` quantizes activations to int8 per 32-block, as
    llama.cpp does, and runs about twice as fast on one row and four to six times as fast on many."""
    lib = _lib_or_raise()
    if w.packed is not None or not lib.tq_packable(w.fmt, w.N, w.K):
        return w
    packed = torch.empty(lib.tq_packed_bytes(w.fmt, w.N, w.K), dtype=torch.uint8)
    if lib.tq_pack(w.fmt, w.data.data_ptr(), w.data.shape[1], w.N, w.K, packed.data_ptr()) != 0:
        raise InvalidArgumentError(f"cannot pack {w.format} weights [{w.N}, {w.K}]")
    return QuantWeight(w.fmt, w.data, w.K, packed)


def matmul(x: Tensor, w: QuantWeight, out: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
           portable: bool = False) -> Tensor:
    """``x @ W.T`` for bf16 ``x`` [..., K] on the CPU: [..., N] in ``out_dtype`` (bfloat16 or float32), or
    written into ``out`` (any 2-d view with unit column stride, e.g. a column slice of a wider output).
    Packed weights (``pack``) take int8 activations; others bf16 activations and bf16-rounded weights."""
    lib = _lib_or_raise()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.bfloat16 or x2.stride(-1) != 1 or shape[-1] != w.K:
        raise InvalidArgumentError(f"matmul wants bf16 [..., {w.K}] with unit stride, got {x.dtype} {tuple(shape)}")
    T = x2.shape[0]
    if out is None:
        out = torch.empty(T, w.N, dtype=out_dtype)
        result = out.view(*shape[:-1], w.N)
    else:
        result = out
    if out.dtype not in (torch.bfloat16, torch.float32) or out.stride(-1) != 1 or tuple(out.shape) != (T, w.N):
        raise InvalidArgumentError(f"out must be [{T}, {w.N}] bf16/float32 with unit column stride")
    if w.packed is not None:
        rc = lib.tq_matmul_packed_bf16(w.fmt, w.packed.data_ptr(), w.N, w.K, x2.data_ptr(), T, x2.stride(0),
                                       out.data_ptr(), out.stride(0), int(out.dtype == torch.bfloat16), int(portable))
    else:
        fn = lib.tq_matmul_portable if portable else lib.tq_matmul
        rc = fn(w.fmt, w.data.data_ptr(), w.data.shape[1], w.N, w.K, x2.data_ptr(), T, x2.stride(0),
                out.data_ptr(), out.stride(0), int(out.dtype == torch.bfloat16))
    if rc != 0:
        raise InvalidArgumentError(f"matmul: {w.format} weights [{w.N}, {w.K}] are not supported")
    return result


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32, rows: Tensor | None = None,
               portable: bool = False) -> Tensor:
    """The weights as floats [N, K] (or only ``rows``, a LongTensor of row indices: [len(rows), K]).
    float32 values equal the gguf package's dequantization bit for bit; bfloat16 ones are those rounded."""
    lib = _lib_or_raise()
    if dtype not in (torch.float32, torch.bfloat16):
        raise InvalidArgumentError(f"dequantize gives float32 or bfloat16, not {dtype}")
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= w.N):
            raise IndexError(f"row index out of range for {w.N} rows")
    n = w.N if rows is None else rows.numel()
    out = torch.empty(n, w.K, dtype=dtype)
    rc = lib.tq_dequantize(w.fmt, w.data.data_ptr(), w.data.shape[1], n, w.K,
                           None if rows is None else rows.data_ptr(), out.data_ptr(),
                           int(dtype == torch.bfloat16), int(portable))
    if rc != 0:
        raise InvalidArgumentError(f"dequantize: {w.format} weights [{w.N}, {w.K}] are not supported")
    return out


def _rows_view(logits: Tensor) -> Tensor | None:
    """``logits`` as [rows, V] float32 on the CPU with unit column stride, or None (PyTorch does it then)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() not in (1, 2) or not available():
        return None
    rows = logits.reshape(1, -1) if logits.dim() == 1 else logits
    return rows if rows.stride(-1) == 1 and rows.shape[-1] > 0 else None


def argmax(logits: Tensor) -> list[int]:
    """Each row's argmax ([V] or [rows, V]) as ints, ties to the lowest index like ``torch.argmax``: a 16-lane
    scan, about 10x faster than PyTorch's on a 49k vocabulary (a real share of a 3 ms decode step)."""
    rows = _rows_view(logits)
    if rows is None:
        return logits.reshape(-1, logits.shape[-1]).argmax(-1).tolist()
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    _lib_or_raise().tq_argmax_rows(rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0), out.data_ptr())
    return out.tolist()


def topk_ids(logits: Tensor, k: int) -> Tensor:
    """The ids of each row's ``k`` largest logits, largest first ([rows, k] int64; ties to the lower index)."""
    rows = _rows_view(logits)
    if rows is None or not 1 <= k <= min(64, rows.shape[1]):
        return logits.reshape(-1, logits.shape[-1]).topk(k, dim=-1).indices
    out = torch.empty(rows.shape[0], k, dtype=torch.int64)
    _lib_or_raise().tq_topk_rows(rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0), k, out.data_ptr())
    return out


PROFILE_PHASES = ("embeddings", "q/k/v projection", "q/k norms, rope, cache writes", "attention",
                  "output projection + residual", "gate/up + activation", "down + residual",
                  "final norm + output layer")


def forward_profile(reset: bool = True) -> tuple[dict[str, float], int]:
    """Seconds the C forward (decoder.c) spent in each phase, summed since the last reset, and the number of
    forwards: where a decode step's time goes."""
    lib = _lib_or_raise()
    out = (ctypes.c_double * (len(PROFILE_PHASES) + 1))()
    lib.tq_profile(out, int(reset))
    return dict(zip(PROFILE_PHASES, out[:len(PROFILE_PHASES)])), int(out[len(PROFILE_PHASES)])
