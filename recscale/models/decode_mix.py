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

At the configs' D = 10, K = 4 a second entry point, ``decode_mix_query``, also computes the router's gates in the
kernel, per strip of samples, from the block's rebalancing map (T, t0) and the router's query weights (U, c):

    ybar[f, :, b]  = mean_m (T[m, f]^T x[m, f, :, b] + t0[m, f])
    g[f, h, :, b]  = softmax_n(c[f, h n : (h+1) n] + U[f, :, h n : (h+1) n]^T ybar[f, :, b])        (n = M K)

so neither the query, the logits nor the gates are written either (backward recomputes them and returns dT, dt0,
dU, dc besides dx, dA, da; its exp is a Taylor polynomial after range reduction, to float32 or float64 precision).

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
static int row_fwd_##SUF(const T *x, const T *A, const T *a, const T *g, T *R, int64_t M, int64_t F, int64_t K,    \
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
static int row_bwd_##SUF(const T *x, const T *A, const T *a, const T *g, const T *dR, T *dx, T *dA, T *da, T *dg,  \
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
/* D = 10, K = 4 (the configs' sizes): strips of one vector along B, D and K compile-time constants, so the D rows of
   x and the running sums stay in registers; results equal the row-wise path's (same summation orders) */
#define DMAX 10  /* the strip path is specialised to D = 10 */
#define HMAX 64
#define DEFINE_STRIP(T, SUF, VL)                                                                                    \
typedef T V_##SUF __attribute__((vector_size(VL * sizeof(T)), aligned(sizeof(T))));                                 \
static inline V_##SUF ld_##SUF(const T *p) { return *(const V_##SUF *)p; }                                         \
static inline void st_##SUF(T *p, V_##SUF v) { *(V_##SUF *)p = v; }                                                 \
static inline T hsum_##SUF(V_##SUF v) { T s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }                \
/* one strip of VL columns; x(m, d) = xs + (m xsm + d) ldx, g(h, i) = gs + (h n + i) ldg, R(h, dp) = Rs + h ldh + dp ldr */ \
static inline __attribute__((always_inline)) void fwd_strip_##SUF(const T *xs, int64_t xsm, int64_t ldx, const T *Af, const T *af, int64_t FDKD, int64_t FKD,\
                            const T *gs, int64_t ldg, T *Rs, int64_t ldh, int64_t ldr, const T *Xr, int64_t ldxh, T alpha, \
                            int64_t M, int64_t K, int64_t D, int64_t H) {                                           \
    const int64_t KD = K * D, n = M * K;                                                                            \
    for (int64_t dp = 0; dp < D; dp++) {                                                                            \
        V_##SUF acc[HMAX];                                                                                          \
        for (int64_t h = 0; h < H; h++) acc[h] = (V_##SUF){0};                                                      \
        for (int64_t m = 0; m < M; m++) {                                                                           \
            const T *Am = Af + m * FDKD, *am = af + m * FKD;                                                        \
            V_##SUF xv[DMAX];                                                                                       \
            for (int64_t d = 0; d < D; d++) xv[d] = ld_##SUF(xs + (m * xsm + d) * ldx);                             \
            for (int64_t k = 0; k < K; k++) {                                                                       \
                const int64_t j = k * D + dp;                                                                       \
                V_##SUF c = (V_##SUF){0} + am[j];                                                                   \
                for (int64_t d = 0; d < D; d++) c += Am[d * KD + j] * xv[d];                                        \
                for (int64_t h = 0; h < H; h++) acc[h] += ld_##SUF(gs + (h * n + m * K + k) * ldg) * c;            \
            }                                                                                                       \
        }                                                                                                           \
        if (Xr)  /* the block's residual: x + alpha R */                                                              \
            for (int64_t h = 0; h < H; h++) st_##SUF(Rs + h * ldh + dp * ldr, ld_##SUF(Xr + h * ldxh + dp * ldr) + alpha * acc[h]); \
        else                                                                                                        \
            for (int64_t h = 0; h < H; h++) st_##SUF(Rs + h * ldh + dp * ldr, acc[h]);                             \
    }                                                                                                               \
}                                                                                                                   \
static inline __attribute__((always_inline)) void bwd_strip_##SUF(const T *xs, int64_t xsm, int64_t ldx, const T *Af, const T *af, int64_t FDKD,          \
                            int64_t FKD, const T *gs, int64_t ldg, const T *dRs, int64_t ldh, int64_t ldr, T *dxs, T *dgs,       \
                            V_##SUF *daacc, V_##SUF *dAacc, T alpha, V_##SUF *dal, int64_t M, int64_t K, int64_t D,  \
                            int64_t H) {                                                                            \
    const int64_t KD = K * D, n = M * K;                                                                            \
    V_##SUF dalv = (V_##SUF){0};  /* a register, not *dal: stores through the accumulators could alias it */     \
    for (int64_t m = 0; m < M; m++) {                                                                               \
        const T *Am = Af + m * FDKD, *am = af + m * FKD;                                                            \
        V_##SUF xv[DMAX], dxv[DMAX];                                                                                \
        for (int64_t d = 0; d < D; d++) { xv[d] = ld_##SUF(xs + (m * xsm + d) * ldx); dxv[d] = (V_##SUF){0}; }     \
        for (int64_t k = 0; k < K; k++) {                                                                           \
            V_##SUF dgv[HMAX];                                                                                      \
            for (int64_t h = 0; h < H; h++) dgv[h] = (V_##SUF){0};                                                  \
            for (int64_t dp = 0; dp < D; dp++) {                                                                    \
                const int64_t j = k * D + dp;                                                                       \
                V_##SUF c = (V_##SUF){0} + am[j];                                                                   \
                for (int64_t d = 0; d < D; d++) c += Am[d * KD + j] * xv[d];                                        \
                V_##SUF dc = (V_##SUF){0};  /* with the residual folded in, dR = alpha dout: scaled below */        \
                for (int64_t h = 0; h < H; h++) {                                                                   \
                    const V_##SUF dr = ld_##SUF(dRs + h * ldh + dp * ldr);                                          \
                    dc += ld_##SUF(gs + (h * n + m * K + k) * ldg) * dr;                                            \
                    dgv[h] += dr * c;                                                                               \
                }                                                                                                   \
                if (dal) dalv += dc * c;  /* dalpha = sum dout . R = sum_{m,k,d'} c (sum_h g dout) */               \
                dc *= alpha;                                                                                        \
                daacc[m * KD + j] += dc;                                                                            \
                V_##SUF *dAm = dAacc + m * D * KD;                                                                  \
                for (int64_t d = 0; d < D; d++) { dAm[d * KD + j] += xv[d] * dc; dxv[d] += Am[d * KD + j] * dc; }  \
            }                                                                                                       \
            for (int64_t h = 0; h < H; h++) st_##SUF(dgs + (h * n + m * K + k) * ldg, alpha * dgv[h]);             \
        }                                                                                                           \
        for (int64_t d = 0; d < D; d++) st_##SUF(dxs + (m * xsm + d) * ldx, dxv[d]);                                \
    }                                                                                                               \
    if (dal) *dal += dalv;                                                                                          \
}                                                                                                                   \
int decode_mix_fwd_##SUF(const T *x, const T *A, const T *a, const T *g, T *R, int64_t M, int64_t F,          \
                               int64_t K, int64_t D, int64_t H, int64_t B, int nthreads) {                          \
    const int64_t KD = K * D, n = M * K, full = B / VL * VL;                                                        \
    if (D != 10 || K != 4 || H > HMAX) return row_fwd_##SUF(x, A, a, g, R, M, F, K, D, H, B, nthreads);          \
    int err = 0;                                                                                                    \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t f = 0; f < F; f++) {                                                                               \
        const T *Af = A + f * D * KD, *af = a + f * KD, *xf = x + f * D * B, *gf = g + f * H * n * B;               \
        T *Rf = R + f * H * D * B;                                                                                  \
        for (int64_t b0 = 0; b0 < full; b0 += VL)  /* D = 10, K = 4 as constants: x in registers */              \
            fwd_strip_##SUF(xf + b0, F * D, B, Af, af, F * D * KD, F * KD, gf + b0, B, Rf + b0, D * B, B, NULL, 0, 1, M, 4, 10, H);   \
        if (full < B) {  /* the last columns, zero-padded to one vector */                                          \
            const int64_t r = B - full;                                                                             \
            T *buf = (T *)calloc((M * D + H * n + H * D) * VL, sizeof(T));                                          \
            if (!buf) { err = 1; continue; }                                                                        \
            T *xb = buf, *gb = buf + M * D * VL, *Rb = gb + H * n * VL;                                             \
            for (int64_t i = 0; i < M * D; i++)                                                                     \
                memcpy(xb + i * VL, xf + ((i / D) * F * D + i % D) * B + full, r * sizeof(T));                      \
            for (int64_t i = 0; i < H * n; i++) memcpy(gb + i * VL, gf + i * B + full, r * sizeof(T));              \
            fwd_strip_##SUF(xb, D, VL, Af, af, F * D * KD, F * KD, gb, VL, Rb, D * VL, VL, NULL, 0, 1, M, 4, 10, H);                     \
            for (int64_t i = 0; i < H * D; i++) memcpy(Rf + i * B + full, Rb + i * VL, r * sizeof(T));              \
            free(buf);                                                                                              \
        }                                                                                                           \
    }                                                                                                               \
    return err;                                                                                                     \
}                                                                                                                   \
int decode_mix_bwd_##SUF(const T *x, const T *A, const T *a, const T *g, const T *dR, T *dx, T *dA, T *da,    \
                               T *dg, int64_t M, int64_t F, int64_t K, int64_t D, int64_t H, int64_t B, int nthreads) {\
    const int64_t KD = K * D, n = M * K, full = B / VL * VL;                                                        \
    if (D != 10 || K != 4 || H > HMAX)                                                                              \
        return row_bwd_##SUF(x, A, a, g, dR, dx, dA, da, dg, M, F, K, D, H, B, nthreads);                           \
    int err = 0;                                                                                                    \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t f = 0; f < F; f++) {                                                                               \
        const T *Af = A + f * D * KD, *af = a + f * KD, *xf = x + f * D * B, *gf = g + f * H * n * B;               \
        const T *dRf = dR + f * H * D * B;                                                                          \
        T *dxf = dx + f * D * B, *dgf = dg + f * H * n * B;                                                         \
        V_##SUF *acc = (V_##SUF *)aligned_alloc(64, ((M * KD + M * D * KD) * sizeof(V_##SUF) + 63) / 64 * 64);      \
        if (!acc) { err = 1; continue; }                                                                            \
        memset(acc, 0, (M * KD + M * D * KD) * sizeof(V_##SUF));                                                    \
        V_##SUF *daacc = acc, *dAacc = acc + M * KD;                                                                \
        for (int64_t b0 = 0; b0 < full; b0 += VL)                                                                   \
            bwd_strip_##SUF(xf + b0, F * D, B, Af, af, F * D * KD, F * KD, gf + b0, B, dRf + b0, D * B, B, dxf + b0,      \
                            dgf + b0, daacc, dAacc, 1, NULL, M, 4, 10, H);                                          \
        if (full < B) {                                                                                             \
            const int64_t r = B - full;                                                                             \
            T *buf = (T *)calloc((2 * M * D + 2 * H * n + H * D) * VL, sizeof(T));                                  \
            if (!buf) { err = 1; free(acc); continue; }                                                             \
            T *xb = buf, *gb = xb + M * D * VL, *dRb = gb + H * n * VL, *dxb = dRb + H * D * VL, *dgb = dxb + M * D * VL; \
            for (int64_t i = 0; i < M * D; i++)                                                                     \
                memcpy(xb + i * VL, xf + ((i / D) * F * D + i % D) * B + full, r * sizeof(T));                      \
            for (int64_t i = 0; i < H * n; i++) memcpy(gb + i * VL, gf + i * B + full, r * sizeof(T));              \
            for (int64_t i = 0; i < H * D; i++) memcpy(dRb + i * VL, dRf + i * B + full, r * sizeof(T));            \
            bwd_strip_##SUF(xb, D, VL, Af, af, F * D * KD, F * KD, gb, VL, dRb, D * VL, VL, dxb, dgb, daacc, dAacc, 1, NULL, M, 4, 10, H); \
            for (int64_t i = 0; i < M * D; i++)                                                                     \
                memcpy(dxf + ((i / D) * F * D + i % D) * B + full, dxb + i * VL, r * sizeof(T));                    \
            for (int64_t i = 0; i < H * n; i++) memcpy(dgf + i * B + full, dgb + i * VL, r * sizeof(T));            \
            free(buf);                                                                                              \
        }                                                                                                           \
        for (int64_t m = 0; m < M; m++)                                                                             \
            for (int64_t j = 0; j < KD; j++) {                                                                      \
                da[(m * F + f) * KD + j] = hsum_##SUF(daacc[m * KD + j]);                                           \
                for (int64_t d = 0; d < D; d++)                                                                     \
                    dA[((m * F + f) * D + d) * KD + j] = hsum_##SUF(dAacc[(m * D + d) * KD + j]);                  \
            }                                                                                                       \
        free(acc);                                                                                                  \
    }                                                                                                               \
    return err;                                                                                                     \
}

/* one vector register: 16 floats with AVX-512 (32 registers hold a strip's x rows, sums and accumulators), else 8 */
#ifdef __AVX512F__
#define VL_F32 16
#else
#define VL_F32 8
#endif
DEFINE_STRIP(float, f32, VL_F32)
DEFINE_STRIP(double, f64, 4)
/* The router's query, logits and softmax in front of the strips (field-local routers, D = 10, K = 4): per strip of
   VL samples, ybar = mean_m (T_m^T x_m + t0_m), L = c + U^T ybar, g = softmax over each head's n = M K candidates, kept
   in a per-thread buffer and fed to the strips above; backward recomputes them. */
#define JMAX 512
#define DEFINE_QUERY(T, SUF, IT, BIAS, MANT, EXPLO, DEG)                                                      \
typedef IT VI_##SUF __attribute__((vector_size(sizeof(V_##SUF)), aligned(sizeof(T))));                             \
static inline V_##SUF vsel_##SUF(VI_##SUF m, V_##SUF a, V_##SUF b) { return (V_##SUF)(((VI_##SUF)a & m) | ((VI_##SUF)b & ~m)); } \
/* e^v for v <= 0 (logits minus their max): 2^n e^r with n = ceil(v log2(e) - 1/2), |r| <= ln(2) / 2, Taylor to DEG */ \
static inline V_##SUF vexp_##SUF(V_##SUF v) {                                                                     \
    const V_##SUF lo = (V_##SUF){0} + (T)(EXPLO), zero = (V_##SUF){0};                                            \
    v = vsel_##SUF(v < lo, lo, v);                                                                                 \
    v = vsel_##SUF(v > zero, zero, v);                                                                             \
    const VI_##SUF ni = __builtin_convertvector(v * (T)1.4426950408889634074 - (T)0.5, VI_##SUF);                  \
    const V_##SUF nf = __builtin_convertvector(ni, V_##SUF);                                                       \
    const V_##SUF r = (v - nf * (T)0.693145751953125) - nf * (T)1.42860682030941723212e-6;                        \
    V_##SUF p = (V_##SUF){0} + (T)1;                                                                               \
    for (int i = DEG; i >= 1; i--) p = p * r * ((T)1 / (T)i) + (T)1;                                               \
    return p * (V_##SUF)((ni + (IT)(BIAS)) << (MANT));                                                            \
}                                                                                                                  \
static inline __attribute__((always_inline)) void query_strip_##SUF(const T *xs, int64_t xsm, int64_t ldx,        \
        const T *Tf, const T *tf, int64_t FDD, int64_t FD, const T *Uf, const T *cf, V_##SUF *yb, V_##SUF *G,     \
        int64_t M, int64_t D, int64_t H, int64_t n) {                                                              \
    const int64_t J = H * n;                                                                                       \
    for (int64_t d = 0; d < D; d++) yb[d] = (V_##SUF){0};                                                          \
    for (int64_t m = 0; m < M; m++) {                                                                              \
        const T *Tm = Tf + m * FDD, *tm = tf + m * FD;                                                             \
        V_##SUF xv[DMAX];                                                                                          \
        for (int64_t d = 0; d < D; d++) xv[d] = ld_##SUF(xs + (m * xsm + d) * ldx);                                \
        for (int64_t dp = 0; dp < D; dp++) {                                                                       \
            V_##SUF y = (V_##SUF){0} + tm[dp];                                                                     \
            for (int64_t d = 0; d < D; d++) y += Tm[d * D + dp] * xv[d];                                           \
            yb[dp] += y;                                                                                           \
        }                                                                                                          \
    }                                                                                                              \
    for (int64_t d = 0; d < D; d++) yb[d] *= (T)1 / (T)M;                                                          \
    for (int64_t j = 0; j < J; j++) {                                                                              \
        V_##SUF l = (V_##SUF){0} + cf[j];                                                                          \
        for (int64_t d = 0; d < D; d++) l += Uf[d * J + j] * yb[d];                                                \
        G[j] = l;                                                                                                  \
    }                                                                                                              \
    for (int64_t h = 0; h < H; h++) {                                                                              \
        V_##SUF *Gh = G + h * n, mx = Gh[0], s = (V_##SUF){0};                                                     \
        for (int64_t i = 1; i < n; i++) mx = vsel_##SUF(Gh[i] > mx, Gh[i], mx);                                    \
        for (int64_t i = 0; i < n; i++) { Gh[i] = vexp_##SUF(Gh[i] - mx); s += Gh[i]; }                            \
        const V_##SUF inv = (T)1 / s;                                                                              \
        for (int64_t i = 0; i < n; i++) Gh[i] *= inv;                                                              \
    }                                                                                                              \
}                                                                                                                  \
/* backward of the query: dg (in DG) -> dlogits, dU, dc, and dx += T_m dy, dT_m, dt0_m with dy = dybar / M */      \
static inline __attribute__((always_inline)) void query_bwd_strip_##SUF(const T *xs, int64_t xsm, int64_t ldx,    \
        T *dxs, const T *Tf, int64_t FDD, const T *Uf, const V_##SUF *yb, const V_##SUF *G, V_##SUF *DG,         \
        V_##SUF *dUacc, V_##SUF *dcacc, V_##SUF *dTacc, V_##SUF *dtacc, const T *muf, const T *Sf, int64_t FD,     \
        int64_t M, int64_t D, int64_t H, int64_t n) {                                                              \
    const int64_t J = H * n;                                                                                       \
    for (int64_t h = 0; h < H; h++) {                                                                              \
        V_##SUF s = (V_##SUF){0};                                                                                  \
        for (int64_t i = 0; i < n; i++) s += G[h * n + i] * DG[h * n + i];                                         \
        for (int64_t i = 0; i < n; i++) DG[h * n + i] = G[h * n + i] * (DG[h * n + i] - s);                        \
    }                                                                                                              \
    V_##SUF dy[DMAX];                                                                                              \
    for (int64_t d = 0; d < D; d++) dy[d] = (V_##SUF){0};                                                          \
    for (int64_t j = 0; j < J; j++) {                                                                              \
        const V_##SUF dl = DG[j];                                                                                  \
        dcacc[j] += dl;                                                                                            \
        for (int64_t d = 0; d < D; d++) { dUacc[d * J + j] += yb[d] * dl; dy[d] += Uf[d * J + j] * dl; }           \
    }                                                                                                              \
    for (int64_t d = 0; d < D; d++) dy[d] *= (T)1 / (T)M;                                                          \
    for (int64_t m = 0; m < M; m++) {                                                                              \
        const T *Tm = Tf + m * FDD;                                                                                \
        V_##SUF *dTm = dTacc + m * D * D, xc[DMAX];                                                                \
        if (Sf)  /* the centred Gram's gradient S = dG + dG^T adds S (x - mean) */                                 \
            for (int64_t d = 0; d < D; d++) xc[d] = ld_##SUF(xs + (m * xsm + d) * ldx) - muf[m * FD + d];          \
        for (int64_t d = 0; d < D; d++) {                                                                          \
            const V_##SUF xv = ld_##SUF(xs + (m * xsm + d) * ldx);                                                 \
            V_##SUF dxv = ld_##SUF(dxs + (m * xsm + d) * ldx);                                                     \
            for (int64_t dp = 0; dp < D; dp++) { dxv += Tm[d * D + dp] * dy[dp]; dTm[d * D + dp] += xv * dy[dp]; } \
            if (Sf)                                                                                                \
                for (int64_t e = 0; e < D; e++) dxv += Sf[m * FDD + d * D + e] * xc[e];                            \
            st_##SUF(dxs + (m * xsm + d) * ldx, dxv);                                                              \
        }                                                                                                          \
        for (int64_t dp = 0; dp < D; dp++) dtacc[m * D + dp] += dy[dp];                                            \
    }                                                                                                              \
}                                                                                                                  \
int decode_mix_q_fwd_##SUF(const T *x, const T *Tq, const T *tq, const T *U, const T *c, const T *A, const T *a,  \
                           const T *xres, int64_t xsets, T alpha, T *R, int64_t M, int64_t F, int64_t K, int64_t D, \
                           int64_t H, int64_t B, int nthreads) {                                                    \
    const int64_t VL = sizeof(V_##SUF) / sizeof(T), KD = K * D, n = M * K, J = H * n, full = B / VL * VL;                                          \
    if (D != 10 || K != 4 || H > HMAX || J > JMAX) return 2;                                                       \
    int err = 0;                                                                                                   \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                             \
    for (int64_t f = 0; f < F; f++) {                                                                              \
        const T *Af = A + f * D * KD, *af = a + f * KD, *xf = x + f * D * B, *Tf = Tq + f * D * D, *tf = tq + f * D; \
        const T *Uf = U + f * D * J, *cf = c + f * J;                                                              \
        T *Rf = R + f * D * B;  /* R (H, F, D, B): head-major */                                           \
        const T *Xf = xres ? xres + f * D * B : NULL;  /* the residual (xsets, F, D, B); one set: every head */  \
        const int64_t ldxh = xsets > 1 ? F * D * B : 0;                                                            \
        V_##SUF *G = (V_##SUF *)aligned_alloc(64, ((J + DMAX) * sizeof(V_##SUF) + 63) / 64 * 64);                  \
        if (!G) { err = 1; continue; }                                                                             \
        V_##SUF *yb = G + J;                                                                                       \
        for (int64_t b0 = 0; b0 < full; b0 += VL) {                                                                \
            query_strip_##SUF(xf + b0, F * D, B, Tf, tf, F * D * D, F * D, Uf, cf, yb, G, M, 10, H, n);           \
            fwd_strip_##SUF(xf + b0, F * D, B, Af, af, F * D * KD, F * KD, (const T *)G, VL, Rf + b0, F * D * B, B, \
                            Xf ? Xf + b0 : NULL, ldxh, alpha, M, 4, 10, H);                                        \
        }                                                                                                          \
        if (full < B) {                                                                                            \
            const int64_t r = B - full;                                                                            \
            T *buf = (T *)calloc((M * D + 2 * H * D) * VL, sizeof(T));                                             \
            if (!buf) { err = 1; free(G); continue; }                                                              \
            T *xb = buf, *Rb = buf + M * D * VL, *Xb = Rb + H * D * VL;                                            \
            if (Xf)                                                                                                \
                for (int64_t i = 0; i < H * D; i++)                                                                \
                    memcpy(Xb + i * VL, Xf + (i / D) * ldxh + (i % D) * B + full, r * sizeof(T));                 \
            for (int64_t i = 0; i < M * D; i++)                                                                    \
                memcpy(xb + i * VL, xf + ((i / D) * F * D + i % D) * B + full, r * sizeof(T));                     \
            query_strip_##SUF(xb, D, VL, Tf, tf, F * D * D, F * D, Uf, cf, yb, G, M, 10, H, n);                   \
            fwd_strip_##SUF(xb, D, VL, Af, af, F * D * KD, F * KD, (const T *)G, VL, Rb, D * VL, VL, Xf ? Xb : NULL, \
                            D * VL, alpha, M, 4, 10, H);                                                           \
            for (int64_t i = 0; i < H * D; i++)                                                                    \
                memcpy(Rf + (i / D) * F * D * B + (i % D) * B + full, Rb + i * VL, r * sizeof(T));                 \
            free(buf);                                                                                             \
        }                                                                                                          \
        free(G);                                                                                                   \
    }                                                                                                              \
    return err;                                                                                                    \
}                                                                                                                  \
int decode_mix_q_bwd_##SUF(const T *x, const T *Tq, const T *tq, const T *U, const T *c, const T *A, const T *a,  \
                           const T *mu, const T *S, T alpha, const T *dR, T *dx, T *dT, T *dt, T *dU, T *dc, T *dA, \
                           T *da, T *dalpha, int64_t M, int64_t F,                                                  \
                           int64_t K, int64_t D, int64_t H, int64_t B, int nthreads) {                              \
    const int64_t VL = sizeof(V_##SUF) / sizeof(T), KD = K * D, n = M * K, J = H * n, full = B / VL * VL;                                          \
    if (D != 10 || K != 4 || H > HMAX || J > JMAX) return 2;                                                       \
    const int64_t nacc = M * KD + M * D * KD + J + D * J + M * D * D + M * D + 1, nbuf = 2 * J + DMAX;             \
    int err = 0;                                                                                                   \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                             \
    for (int64_t f = 0; f < F; f++) {                                                                              \
        const T *Af = A + f * D * KD, *af = a + f * KD, *xf = x + f * D * B, *Tf = Tq + f * D * D, *tf = tq + f * D; \
        const T *Uf = U + f * D * J, *cf = c + f * J, *dRf = dR + f * D * B;                                    \
        const T *muf = S ? mu + f * D : NULL, *Sf = S ? S + f * D * D : NULL;                                      \
        T *dxf = dx + f * D * B;                                                                                   \
        V_##SUF *acc = (V_##SUF *)aligned_alloc(64, ((nacc + nbuf) * sizeof(V_##SUF) + 63) / 64 * 64);             \
        if (!acc) { err = 1; continue; }                                                                           \
        memset(acc, 0, nacc * sizeof(V_##SUF));                                                                    \
        V_##SUF *daacc = acc, *dAacc = daacc + M * KD, *dcacc = dAacc + M * D * KD, *dUacc = dcacc + J;            \
        V_##SUF *dTacc = dUacc + D * J, *dtacc = dTacc + M * D * D, *dal = dtacc + M * D, *G = dal + 1, *DG = G + J; \
        V_##SUF *yb = DG + J;                                                                                      \
        for (int64_t b0 = 0; b0 < full; b0 += VL) {                                                                \
            query_strip_##SUF(xf + b0, F * D, B, Tf, tf, F * D * D, F * D, Uf, cf, yb, G, M, 10, H, n);           \
            bwd_strip_##SUF(xf + b0, F * D, B, Af, af, F * D * KD, F * KD, (const T *)G, VL, dRf + b0, F * D * B, B, dxf + b0,\
                            (T *)DG, daacc, dAacc, alpha, dalpha ? dal : NULL, M, 4, 10, H);                       \
            query_bwd_strip_##SUF(xf + b0, F * D, B, dxf + b0, Tf, F * D * D, Uf, yb, G, DG, dUacc, dcacc, dTacc, \
                                  dtacc, muf, Sf, F * D, M, 10, H, n);                                             \
        }                                                                                                          \
        if (full < B) {  /* zero-padded: the padded lanes have dR = 0, so they add nothing to the sums */         \
            const int64_t r = B - full;                                                                            \
            T *buf = (T *)calloc((2 * M * D + H * D) * VL, sizeof(T));                                             \
            if (!buf) { err = 1; free(acc); continue; }                                                            \
            T *xb = buf, *dRb = xb + M * D * VL, *dxb = dRb + H * D * VL;                                          \
            for (int64_t i = 0; i < M * D; i++)                                                                    \
                memcpy(xb + i * VL, xf + ((i / D) * F * D + i % D) * B + full, r * sizeof(T));                     \
            for (int64_t i = 0; i < H * D; i++)                                                                    \
                memcpy(dRb + i * VL, dRf + (i / D) * F * D * B + (i % D) * B + full, r * sizeof(T));               \
            query_strip_##SUF(xb, D, VL, Tf, tf, F * D * D, F * D, Uf, cf, yb, G, M, 10, H, n);                   \
            bwd_strip_##SUF(xb, D, VL, Af, af, F * D * KD, F * KD, (const T *)G, VL, dRb, D * VL, VL, dxb, (T *)DG, daacc, \
                            dAacc, alpha, dalpha ? dal : NULL, M, 4, 10, H);                                       \
            query_bwd_strip_##SUF(xb, D, VL, dxb, Tf, F * D * D, Uf, yb, G, DG, dUacc, dcacc, dTacc, dtacc, muf, Sf, \
                                  F * D, M, 10, H, n);                                                             \
            for (int64_t i = 0; i < M * D; i++)                                                                    \
                memcpy(dxf + ((i / D) * F * D + i % D) * B + full, dxb + i * VL, r * sizeof(T));                   \
            free(buf);                                                                                             \
        }                                                                                                          \
        for (int64_t m = 0; m < M; m++) {                                                                          \
            for (int64_t j = 0; j < KD; j++) {                                                                     \
                da[(m * F + f) * KD + j] = hsum_##SUF(daacc[m * KD + j]);                                          \
                for (int64_t d = 0; d < D; d++)                                                                    \
                    dA[((m * F + f) * D + d) * KD + j] = hsum_##SUF(dAacc[(m * D + d) * KD + j]);                 \
            }                                                                                                      \
            for (int64_t d = 0; d < D * D; d++) dT[(m * F + f) * D * D + d] = hsum_##SUF(dTacc[m * D * D + d]);   \
            for (int64_t d = 0; d < D; d++) dt[(m * F + f) * D + d] = hsum_##SUF(dtacc[m * D + d]);               \
        }                                                                                                          \
        if (dalpha) dalpha[f] = hsum_##SUF(*dal);                                                                  \
        for (int64_t j = 0; j < J; j++) {                                                                          \
            dc[f * J + j] = hsum_##SUF(dcacc[j]);                                                                  \
            for (int64_t d = 0; d < D; d++) dU[(f * D + d) * J + j] = hsum_##SUF(dUacc[d * J + j]);               \
        }                                                                                                          \
        free(acc);                                                                                                 \
    }                                                                                                              \
    return err;                                                                                                    \
}

DEFINE_QUERY(float, f32, int32_t, 127, 23, -87.0, 7)
DEFINE_QUERY(double, f64, int64_t, 1023, 52, -708.0, 13)
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
        real = ctypes.c_float if suf == "f32" else ctypes.c_double
        getattr(lib, f"decode_mix_q_fwd_{suf}").argtypes = [ptr] * 8 + [i64, real, ptr] + [i64] * 6 + [cint]
        getattr(lib, f"decode_mix_q_bwd_{suf}").argtypes = [ptr] * 9 + [real] + [ptr] * 9 + [i64] * 6 + [cint]
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


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(entry: str, dtype: torch.dtype, *args) -> None:
    """Calls ``{entry}_f32`` or ``{entry}_f64`` with ``args`` and the thread count; a non-zero return is a failed
    allocation inside the kernel."""
    suf = "f32" if dtype == torch.float32 else "f64"
    if getattr(_lib, f"{entry}_{suf}")(*args, torch.get_num_threads()):
        raise MemoryError(f"{entry}: out of memory for a kernel buffer")


def _require() -> None:
    if not available():
        raise RuntimeError(f"the native decode-mix kernel is unavailable: {_why}")


class DecodeMix(torch.autograd.Function):
    """``R = decode_mix(x, A, a, g)``: x (M, F, D, B), A (M, F, D, K D), a (M, F, K D), g (F, H, M K, B) ->
    R (F, H, D, B), as in the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, a: Tensor, g: Tensor) -> Tensor:
        x, A, a, g = (t.contiguous() for t in (x, A, a, g))
        M, F, D, B = x.shape
        K, H = A.shape[-1] // D, g.shape[1]
        R = torch.empty((F, H, D, B), dtype=x.dtype)
        _run("decode_mix_fwd", x.dtype, *map(_p, (x, A, a, g, R)), M, F, K, D, H, B)
        ctx.save_for_backward(x, A, a, g)
        return R

    @staticmethod
    def backward(ctx, dR: Tensor):
        x, A, a, g = ctx.saved_tensors
        dR = dR.contiguous().to(x.dtype)
        M, F, D, B = x.shape
        K, H = A.shape[-1] // D, g.shape[1]
        dx, dA, da, dg = (torch.empty_like(t) for t in (x, A, a, g))
        _run("decode_mix_bwd", x.dtype, *map(_p, (x, A, a, g, dR, dx, dA, da, dg)), M, F, K, D, H, B)
        return dx, dA, da, dg


def decode_mix(x: Tensor, A: Tensor, a: Tensor, g: Tensor) -> Tensor:
    _require()
    return DecodeMix.apply(x, A, a, g)


class DecodeMixQuery(torch.autograd.Function):
    """``R = decode_mix_query(x, T, t0, U, c, A, a)``: ``decode_mix`` with the router's gates computed in the kernel,
    ``g[f, h, :, b] = softmax_n(c[f, h n : (h+1) n] + U[f, :, h n : (h+1) n]^T ybar[f, :, b])``, ``ybar = mean_m
    (T[m, f]^T x[m, f] + t0[m, f])``: x (M, F, D, B), T (M, F, D, D), t0 (M, F, D), U (F, D, H n), c (F, H n),
    A (M, F, D, K D), a (M, F, K D) -> R (H, F, D, B), head-major (the layout the router's output takes). Neither the
    gates nor the components are written; backward recomputes both per strip of samples. D = 10, K = 4 only
    (``query_applies``).

    With ``gram = (G, mean)``, x's centred Gram (M, F, D, D) and row mean (M, F, D, 1) computed without a graph, it
    also returns G as an output whose gradient dG reaches x through this node: the kernel adds ``(dG + dG^T)
    (x - mean)`` to dx as it writes it (the HSIC's path to x, with no matmul and no gradient sum of its own).
    With ``xres`` (M or 1, F, D, B) and a 0-d ``alpha`` (None: 1) it writes the block's output ``xres + alpha R``
    instead of R (the residual in the same pass; backward takes ``dR = alpha dout`` on the fly and ``dalpha =
    sum dout . R`` from the components it recomputes)."""

    @staticmethod
    def forward(ctx, x, T, t0, U, c, A, a, G=None, mean=None, xres=None, alpha=None):
        x, T, t0, U, c, A, a = (t.contiguous() for t in (x, T, t0, U, c, A, a))
        M, F, D, B = x.shape
        K, H = A.shape[-1] // D, U.shape[-1] // (M * A.shape[-1] // D)
        R = torch.empty((H, F, D, B), dtype=x.dtype)
        ctx.res = xres is not None
        if ctx.res:
            xres = xres.contiguous()
            ctx.xres_shape = xres.shape
        ctx.alpha = 1.0 if alpha is None else float(alpha)
        _run("decode_mix_q_fwd", x.dtype, *map(_p, (x, T, t0, U, c, A, a, xres)), xres.shape[0] if ctx.res else 0,
             ctx.alpha, _p(R), M, F, K, D, H, B)
        ctx.save_for_backward(x, T, t0, U, c, A, a, mean, alpha)
        if G is None:
            return R
        return R, G.clone()

    @staticmethod
    def backward(ctx, dR, dG=None):
        x, T, t0, U, c, A, a, mean, alpha = ctx.saved_tensors
        dR = dR.contiguous().to(x.dtype)
        M, F, D, B = x.shape
        K, H = A.shape[-1] // D, dR.shape[0]
        grads = [torch.empty_like(t) for t in (x, T, t0, U, c, A, a)]
        S = mu = None
        if dG is not None:
            S = (dG + dG.transpose(-1, -2)).to(x.dtype).contiguous()
            mu = mean.to(x.dtype).contiguous()
        want_alpha = alpha is not None and ctx.needs_input_grad[10]
        dalpha = torch.empty(F, dtype=x.dtype) if want_alpha else None
        _run("decode_mix_q_bwd", x.dtype, *map(_p, (x, T, t0, U, c, A, a, mu, S)), ctx.alpha,
             *map(_p, (dR, *grads, dalpha)), M, F, K, D, H, B)
        dxres = None
        if ctx.res and ctx.needs_input_grad[9]:  # the residual's input: dout, summed over heads when broadcast
            dxres = dR if ctx.xres_shape == dR.shape else dR.sum_to_size(ctx.xres_shape)
        return (*grads, None, None, dxres, None if dalpha is None else dalpha.sum().to(alpha.dtype))


def query_applies(x: Tensor, components: int, heads: int) -> bool:
    """Whether ``decode_mix_query`` serves these sizes: the strip kernel's D = 10, K = 4, and at most 512 gates per
    sample and field."""
    M, F, D, B = x.shape
    return D == 10 and components == 4 and heads <= 64 and heads * M * 4 <= 512


def decode_mix_query(x: Tensor, T: Tensor, t0: Tensor, U: Tensor, c: Tensor, A: Tensor, a: Tensor,
                     gram: tuple[Tensor, Tensor] | None = None,
                     residual: tuple[Tensor, Tensor | None] | None = None):
    """R, or (R, G) with ``gram = (G, mean)``; with ``residual = (xres, alpha)`` (alpha None: 1), ``xres + alpha R``
    in place of R (see ``DecodeMixQuery``)."""
    _require()
    G, mean = (None, None) if gram is None else (gram[0].detach(), gram[1].detach())
    xres, alpha = (None, None) if residual is None else residual
    return DecodeMixQuery.apply(x, T, t0, U, c, A, a, G, mean, xres, alpha)
