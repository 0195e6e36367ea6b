"""RoBlock's decode-and-mix step as one native CPU kernel that never writes the components.

The field-local routers of RoBlock (``within_field``, ``factorized``; ROBLOCK.md Secs. 2.3-2.4) need, per field f and
output head h, on batch-last activations (B contiguous):

    C[m, f, k, :, b]  = A[m, f, :, k D : (k+1) D]^T x[m, f, :, b] + a[m, f, k D : (k+1) D]     (the K components)
    R[f, h, :, b]     = sum_{m, k} g[f, h, m K + k, b] C[m, f, k, :, b]                          (the gated mixture)

With torch operations C is a (M, F, K, D, B) tensor, K times the activations, written once and read three to four
times over forward and backward; at D = 10 that memory traffic, not arithmetic, is what RoBlock's tail costs on a
CPU (BENCHMARKS.md "RoBlock"). This kernel recomputes each row C[m, f, k, d', :] (B values, in cache) where it is
needed and writes only R in forward and dx, dA, da, dg in backward:

    dC[m, f, k, d', b] = sum_h g[f, h, m K + k, b] dR[f, h, d', b]        (never stored)
    dg[f, h, m K + k, b] = sum_d' dR[f, h, d', b] C[m, f, k, d', b]
    dx[m, f, d, b]       = sum_{k, d'} A[m, f, d, k D + d'] dC[m, f, k, d', b]
    dA[m, f, d, k D + d'] = sum_b x[m, f, d, b] dC[m, f, k, d', b],      da[m, f, k D + d'] = sum_b dC[m, f, k, d', b]

Our implementation (no source describes one). Built on first use with the system C compiler (``cc -O3
-march=native -fopenmp``) into ``$RECSCALE_CACHE`` (default ``~/.cache/recscale``), loaded with ctypes; float32 and
float64 CPU tensors only (the autocast path, CUDA and a machine without a compiler use the torch operations, which
compute the same function: tests/test_roblock.py compares both). ``RECSCALE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEFINE(T, SUF)                                                                                              \
/* row c[b] = a + sum_d A[d, j] x[d, b] over the full batch */                                                      \
static void comp_row_##SUF(const T *xmf, const T *Amf, T aj, int64_t j, int64_t KD, int64_t D, int64_t B, T *c) {  \
    for (int64_t b = 0; b < B; b++) c[b] = aj;                                                                      \
    for (int64_t d = 0; d < D; d++) {                                                                               \
        const T w = Amf[d * KD + j];                                                                                \
        const T *xr = xmf + d * B;                                                                                  \
        _Pragma("omp simd")                                                                                         \
        for (int64_t b = 0; b < B; b++) c[b] += w * xr[b];                                                          \
    }                                                                                                               \
}                                                                                                                   \
int decode_mix_fwd_##SUF(const T *x, const T *A, const T *a, const T *g, T *R, int64_t M, int64_t F, int64_t K,    \
                         int64_t D, int64_t H, int64_t B, int nthreads) {                                           \
    const int64_t KD = K * D, n = M * K;                                                                            \
    int err = 0;                                                                                                    \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t f = 0; f < F; f++) {                                                                               \
        T *c = (T *)malloc(sizeof(T) * B);                                                                          \
        if (!c) { err = 1; continue; }                                                                              \
        memset(R + f * H * D * B, 0, sizeof(T) * H * D * B);                                                        \
        /* output coordinate outermost: the H rows R[f, :, dp] stay in cache while all M K components add in */    \
        for (int64_t dp = 0; dp < D; dp++)                                                                          \
            for (int64_t m = 0; m < M; m++) {                                                                       \
                const T *xmf = x + (m * F + f) * D * B, *Amf = A + (m * F + f) * D * KD, *amf = a + (m * F + f) * KD; \
                for (int64_t k = 0; k < K; k++) {                                                                   \
                    const int64_t j = k * D + dp;                                                                   \
                    comp_row_##SUF(xmf, Amf, amf[j], j, KD, D, B, c);                                               \
                    for (int64_t h = 0; h < H; h++) {                                                               \
                        const T *gr = g + ((f * H + h) * n + m * K + k) * B;                                        \
                        T *Rr = R + ((f * H + h) * D + dp) * B;                                                     \
                        _Pragma("omp simd")                                                                         \
                        for (int64_t b = 0; b < B; b++) Rr[b] += gr[b] * c[b];                                      \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
        free(c);                                                                                                    \
    }                                                                                                               \
    return err;                                                                                                     \
}                                                                                                                   \
int decode_mix_bwd_##SUF(const T *x, const T *A, const T *a, const T *g, const T *dR, T *dx, T *dA, T *da, T *dg,  \
                         int64_t M, int64_t F, int64_t K, int64_t D, int64_t H, int64_t B, int nthreads) {          \
    const int64_t KD = K * D, n = M * K;                                                                            \
    int err = 0;                                                                                                    \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t f = 0; f < F; f++) {                                                                               \
        T *c = (T *)malloc(sizeof(T) * 2 * B);                                                                      \
        if (!c) { err = 1; continue; }                                                                              \
        T *dc = c + B;                                                                                              \
        for (int64_t h = 0; h < H; h++) memset(dg + (f * H + h) * n * B, 0, sizeof(T) * n * B);                     \
        for (int64_t m = 0; m < M; m++) {                                                                           \
            const int64_t mf = m * F + f;                                                                           \
            const T *xmf = x + mf * D * B, *Amf = A + mf * D * KD, *amf = a + mf * KD;                              \
            T *dxmf = dx + mf * D * B, *dAmf = dA + mf * D * KD, *damf = da + mf * KD;                              \
            memset(dxmf, 0, sizeof(T) * D * B);                                                                     \
            for (int64_t k = 0; k < K; k++)                                                                         \
                for (int64_t dp = 0; dp < D; dp++) {                                                                \
                    const int64_t j = k * D + dp;                                                                   \
                    comp_row_##SUF(xmf, Amf, amf[j], j, KD, D, B, c);                                               \
                    memset(dc, 0, sizeof(T) * B);                                                                   \
                    for (int64_t h = 0; h < H; h++) {                                                               \
                        const T *gr = g + ((f * H + h) * n + m * K + k) * B;                                        \
                        const T *dRr = dR + ((f * H + h) * D + dp) * B;                                             \
                        T *dgr = dg + ((f * H + h) * n + m * K + k) * B;                                            \
                        _Pragma("omp simd")                                                                         \
                        for (int64_t b = 0; b < B; b++) { dc[b] += gr[b] * dRr[b]; dgr[b] += dRr[b] * c[b]; }       \
                    }                                                                                               \
                    T s = 0;                                                                                        \
                    for (int64_t d = 0; d < D; d++) {                                                               \
                        const T *xr = xmf + d * B;                                                                  \
                        T *dxr = dxmf + d * B;                                                                      \
                        const T w = Amf[d * KD + j];                                                                \
                        T t = 0;                                                                                    \
                        if (d == 0) {                                                                               \
                            _Pragma("omp simd reduction(+:t, s)")                                                   \
                            for (int64_t b = 0; b < B; b++) { t += xr[b] * dc[b]; s += dc[b]; dxr[b] += w * dc[b]; } \
                        } else {                                                                                    \
                            _Pragma("omp simd reduction(+:t)")                                                      \
                            for (int64_t b = 0; b < B; b++) { t += xr[b] * dc[b]; dxr[b] += w * dc[b]; }            \
                        }                                                                                           \
                        dAmf[d * KD + j] = t;                                                                       \
                    }                                                                                               \
                    damf[j] = s;                                                                                    \
                }                                                                                                   \
        }                                                                                                           \
        free(c);                                                                                                    \
    }                                                                                                               \
    return err;                                                                                                     \
}

DEFINE(float, f32)
DEFINE(double, f64)
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable (reason in _why)
_why = ""


def _cache_dir() -> Path:
    return Path(os.environ.get("RECSCALE_CACHE") or Path.home() / ".cache" / "recscale") / "native"


def _build() -> ctypes.CDLL:
    """Compile the kernel once per source, flags and machine (``-march=native``), atomically: concurrent processes
    (pytest-xdist, DDP ranks) each write a temporary file and rename it into place."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_SOURCE, cc, *_FLAGS, os.uname().machine, os.uname().nodename]).encode())
    out = _cache_dir() / f"decode_mix-{key.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src, so = Path(tmp) / "decode_mix.c", Path(tmp) / "decode_mix.so"
            src.write_text(_SOURCE)
            p = subprocess.run([cc, *_FLAGS, str(src), "-o", str(so)], capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{cc} failed: {p.stderr.strip()[-500:]}")
            os.replace(so, out)
    lib = ctypes.CDLL(str(out))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for suf in ("f32", "f64"):
        getattr(lib, f"decode_mix_fwd_{suf}").argtypes = [ptr] * 5 + [i64] * 6 + [cint]
        getattr(lib, f"decode_mix_bwd_{suf}").argtypes = [ptr] * 9 + [i64] * 6 + [cint]
    return lib


def available() -> bool:
    """Whether the native kernel can run here (built and loaded on the first call; never raises)."""
    global _lib, _why
    if _lib is None:
        with _lock:
            if _lib is None:
                if os.environ.get("RECSCALE_NATIVE", "1") == "0":
                    _lib, _why = False, "RECSCALE_NATIVE=0"
                else:
                    try:
                        _lib = _build()
                    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                        _lib, _why = False, str(e)
                        print(f"recscale: the native RoBlock kernel is unavailable ({_why}); using torch operations",
                              file=sys.stderr)
    return bool(_lib)


def unavailable_reason() -> str:
    return _why


def applies(*tensors: Tensor) -> bool:
    """The kernel serves float32/float64 CPU tensors outside autocast."""
    t = tensors[0]
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and all(u.dtype == t.dtype and u.device.type == "cpu" for u in tensors)
            and not torch.is_autocast_enabled("cpu") and available())


def _p(t: Tensor) -> int:
    return t.data_ptr()


class DecodeMix(torch.autograd.Function):
    """``R = decode_mix(x, A, a, g)``: x (M, F, D, B), A (M, F, D, K D), a (M, F, K D), g (F, H, M K, B) ->
    R (F, H, D, B), as in the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, a: Tensor, g: Tensor) -> Tensor:
        x, A, a, g = (t.contiguous() for t in (x, A, a, g))
        M, F, D, B = x.shape
        K, H = A.shape[-1] // D, g.shape[1]
        R = torch.empty((F, H, D, B), dtype=x.dtype)
        suf = "f32" if x.dtype == torch.float32 else "f64"
        if getattr(_lib, f"decode_mix_fwd_{suf}")(_p(x), _p(A), _p(a), _p(g), _p(R), M, F, K, D, H, B,
                                                  torch.get_num_threads()):
            raise MemoryError("decode_mix: out of memory for a batch-sized row buffer")
        ctx.save_for_backward(x, A, a, g)
        return R

    @staticmethod
    def backward(ctx, dR: Tensor):
        x, A, a, g = ctx.saved_tensors
        dR = dR.contiguous().to(x.dtype)
        M, F, D, B = x.shape
        K, H = A.shape[-1] // D, g.shape[1]
        dx, dA, da, dg = (torch.empty_like(t) for t in (x, A, a, g))
        suf = "f32" if x.dtype == torch.float32 else "f64"
        if getattr(_lib, f"decode_mix_bwd_{suf}")(_p(x), _p(A), _p(a), _p(g), _p(dR), _p(dx), _p(dA), _p(da), _p(dg),
                                                  M, F, K, D, H, B, torch.get_num_threads()):
            raise MemoryError("decode_mix: out of memory for a batch-sized row buffer")
        return dx, dA, da, dg


def decode_mix(x: Tensor, A: Tensor, a: Tensor, g: Tensor) -> Tensor:
    if not available():
        raise RuntimeError(f"the native decode-mix kernel is unavailable: {_why}")
    return DecodeMix.apply(x, A, a, g)
