// The per-thread sweeps of the CUDA weighted cross-entropy kernels (cuda/cross_entropy.cu):
// element types, 16-byte loads and stores, and row_partial / row_grad / row_zero, which every
// thread of a block runs over its share of the block's row; the kernels add only the block
// reduction (warp shuffles + shared memory) and the launch. All __host__ __device__: a plain
// C++ compiler gets common/math.h's bit-exact stand-ins for the CUDA intrinsics, so that
// tests/csrc/test_cuda_ce_host.py runs the sweeps thread by thread against the PyTorch
// reference (row split, index mapping, in-place ordering, per-element maths) without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cross_entropy.h"
#include "common/math.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace thr {
namespace ce {

// ---- element types: storage, and conversion to/from float (the accumulation type) ----------

template <int D> struct Elem;

template <> struct Elem<kFloat32> {
  using S = float;
  static constexpr int kVec = 4;  // elements per 16-byte vector
  static THR_HD float to_float(S v) { return v; }
  static THR_HD S from_float(float f) { return f; }
  static THR_HD void unpack(const uint32_t (&w)[4], float (&f)[kVec]) {
THR_CE_UNROLL
    for (int k = 0; k < 4; ++k) f[k] = bits_to_float(w[k]);
  }
  static THR_HD void pack(const float (&f)[kVec], uint32_t (&w)[4]) {
THR_CE_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = float_to_bits(f[k]);
  }
};

// Two 16-bit elements per 32-bit word, the lower address in the low half (little endian,
// on both the host and the GPU). On the GPU the float -> 16-bit rounding is the hardware
// round-to-nearest-even conversion (one instruction per pair); on the host it is common/math.h's
// bit-exact equivalent.
template <> struct Elem<kBFloat16> {
  using S = uint16_t;
  static constexpr int kVec = 8;
  static THR_HD float to_float(S v) { return bf16_to_float(v); }
  static THR_HD S from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    return float_to_bf16(f);
#endif
  }
  static THR_HD uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
#else
    return static_cast<uint32_t>(float_to_bf16(lo)) | (static_cast<uint32_t>(float_to_bf16(hi)) << 16);
#endif
  }
  static THR_HD void unpack(const uint32_t (&w)[4], float (&f)[kVec]) {
THR_CE_UNROLL
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = bits_to_float(w[k] << 16);
      f[2 * k + 1] = bits_to_float(w[k] & 0xffff0000u);
    }
  }
  static THR_HD void pack(const float (&f)[kVec], uint32_t (&w)[4]) {
THR_CE_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = pack2(f[2 * k], f[2 * k + 1]);
  }
};

template <> struct Elem<kFloat16> {
  using S = uint16_t;
  static constexpr int kVec = 8;
  static THR_HD float to_float(S v) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(v));
#else
    return half_to_float(v);
#endif
  }
  static THR_HD S from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    return float_to_half(f);
#endif
  }
  static THR_HD uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
#else
    return static_cast<uint32_t>(float_to_half(lo)) | (static_cast<uint32_t>(float_to_half(hi)) << 16);
#endif
  }
  static THR_HD void unpack(const uint32_t (&w)[4], float (&f)[kVec]) {
THR_CE_UNROLL
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = to_float(static_cast<S>(w[k] & 0xffffu));
      f[2 * k + 1] = to_float(static_cast<S>(w[k] >> 16));
    }
  }
  static THR_HD void pack(const float (&f)[kVec], uint32_t (&w)[4]) {
THR_CE_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = pack2(f[2 * k], f[2 * k + 1]);
  }
};

// ---- 16-byte memory access ------------------------------------------------------------------
// kLastUse: the second sweep's reads are the row's last use and its gradient writes are not
// read again by this kernel, so both are marked evict-first (.cs): L2 then keeps the rows
// other blocks are still between their two sweeps of.

// A host build that defines THR_CE_HOST_CHECKS provides thr_ce_misaligned(p), called for any
// 16-byte access that would fault on the GPU (the host itself does not care).
#if defined(THR_CE_HOST_CHECKS) && !defined(__CUDA_ARCH__)
extern "C" void thr_ce_misaligned(const void* p);
#define THR_CE_CHECK_ALIGNED(p) \
  if (reinterpret_cast<uintptr_t>(p) & 15u) thr_ce_misaligned(p)
#else
#define THR_CE_CHECK_ALIGNED(p) (void)0
#endif

template <bool kLastUse>
THR_HD void load16(const void* p, uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__)
  uint4 v = kLastUse ? __ldcs(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
  w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
#else
  THR_CE_CHECK_ALIGNED(p);
  std::memcpy(w, p, 16);
#endif
}

THR_HD void store16(void* p, const uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__)
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
#else
  THR_CE_CHECK_ALIGNED(p);
  std::memcpy(p, w, 16);
#endif
}

// Thread t takes the vectors t, t + nthreads, ... (coalesced), kUnroll at a time so that
// kUnroll 16-byte loads are in flight per thread.
template <int D>
THR_HD Partial row_partial(const typename Elem<D>::S* row, int V, int tid, int nthreads,
                           bool want_sum_x, float cap = 0.0f) {
  const float inv = cap == 0.0f ? 0.0f : 1.0f / cap;
  using E = Elem<D>;
  Partial p{LseState{neg_inf(), 0.0f}, 0.0};
  const RowSplit sp = split_row(row, V);
  for (int j = tid; j < sp.head; j += nthreads) {
    const float f[1] = {softcap_value(E::to_float(row[j]), cap, inv)};
    push(p, f, want_sum_x);
  }
  for (int j = sp.tail_start + tid; j < V; j += nthreads) {
    const float f[1] = {softcap_value(E::to_float(row[j]), cap, inv)};
    push(p, f, want_sum_x);
  }
  const unsigned char* base = reinterpret_cast<const unsigned char*>(row + sp.head);
  int i = tid;
  for (; i + (kUnroll - 1) * nthreads < sp.nvec; i += kUnroll * nthreads) {
    uint32_t w[kUnroll][4];
THR_CE_UNROLL
    for (int u = 0; u < kUnroll; ++u) load16<false>(base + 16 * static_cast<size_t>(i + u * nthreads), w[u]);
THR_CE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      float f[E::kVec];
      E::unpack(w[u], f);
THR_CE_UNROLL
      for (int k = 0; k < E::kVec; ++k) f[k] = softcap_value(f[k], cap, inv);
      push(p, f, want_sum_x);
    }
  }
  for (; i < sp.nvec; i += nthreads) {
    uint32_t w[4];
    load16<false>(base + 16 * static_cast<size_t>(i), w);
    float f[E::kVec];
    E::unpack(w, f);
THR_CE_UNROLL
    for (int k = 0; k < E::kVec; ++k) f[k] = softcap_value(f[k], cap, inv);
    push(p, f, want_sum_x);
  }
  return p;
}

// ---- pass 2: gradient -----------------------------------------------------------------------

// Per-element maths (lse = logsumexp(x), p = exp(x - lse), smoothing eps, z-loss zl, row
// coefficient c): g_j = c (p_j (1 + 2 zl lse) - eps/V) - c (1 - eps) [j == y]. With a soft-cap
// k != 0 each x_j is first replaced by k tanh(x_j / k) (row_partial: after unpacking; row_grad:
// capped_grad_value) and g_j is multiplied by 1 - tanh^2(x_j / k). GradCoef, grad_coef,
// capped_grad_value, ...: common/math.h (shared with the CPU kernels).

// Writes g_j = grad_value(x_j) for this thread's elements (the target is fixed up by the
// caller afterwards). grad may alias row: every element is read, then written, by the one
// thread that owns it, and never read again. The vectors are walked from the row's end so
// the most recently read (most likely still cached) part of the row is re-read first. When
// grad's misalignment differs from the row's, loads stay vectorised and stores go scalar.
template <int D>
THR_HD void row_grad(const typename Elem<D>::S* row, typename Elem<D>::S* grad, int V, int tid,
                     int nthreads, const GradCoef& c) {
  using E = Elem<D>;
  using S = typename E::S;
  const RowSplit sp = split_row(row, V);
  const bool vec_store =
      ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(grad)) & 15u) == 0;
  for (int j = sp.tail_start + tid; j < V; j += nthreads) grad[j] = E::from_float(capped_grad_value(E::to_float(row[j]), c));
  const unsigned char* base = reinterpret_cast<const unsigned char*>(row + sp.head);
  S* gbase = grad + sp.head;
  const int last = sp.nvec - 1;
  int r = tid;  // vector last - r
  for (; r + (kUnroll - 1) * nthreads < sp.nvec; r += kUnroll * nthreads) {
    uint32_t w[kUnroll][4];
THR_CE_UNROLL
    for (int u = 0; u < kUnroll; ++u) load16<true>(base + 16 * static_cast<size_t>(last - (r + u * nthreads)), w[u]);
THR_CE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      float f[E::kVec];
      E::unpack(w[u], f);
THR_CE_UNROLL
      for (int k = 0; k < E::kVec; ++k) f[k] = capped_grad_value(f[k], c);
      const size_t v = static_cast<size_t>(last - (r + u * nthreads));
      if (vec_store) {
        E::pack(f, w[u]);
        store16(gbase + v * E::kVec, w[u]);
      } else {
THR_CE_UNROLL
        for (int k = 0; k < E::kVec; ++k) gbase[v * E::kVec + k] = E::from_float(f[k]);
      }
    }
  }
  for (; r < sp.nvec; r += nthreads) {
    const size_t v = static_cast<size_t>(last - r);
    uint32_t w[4];
    load16<true>(base + 16 * v, w);
    float f[E::kVec];
    E::unpack(w, f);
THR_CE_UNROLL
    for (int k = 0; k < E::kVec; ++k) f[k] = capped_grad_value(f[k], c);
    if (vec_store) {
      E::pack(f, w);
      store16(gbase + v * E::kVec, w);
    } else {
THR_CE_UNROLL
      for (int k = 0; k < E::kVec; ++k) gbase[v * E::kVec + k] = E::from_float(f[k]);
    }
  }
  for (int j = tid; j < sp.head; j += nthreads) grad[j] = E::from_float(capped_grad_value(E::to_float(row[j]), c));
}

// Zeros this thread's share of a gradient row (ignored rows, zero coefficients).
template <int D>
THR_HD void row_zero(typename Elem<D>::S* grad, int V, int tid, int nthreads) {
  using S = typename Elem<D>::S;
  const RowSplit sp = split_row(grad, V);
  for (int j = tid; j < sp.head; j += nthreads) grad[j] = S(0);
  for (int j = sp.tail_start + tid; j < V; j += nthreads) grad[j] = S(0);
  unsigned char* base = reinterpret_cast<unsigned char*>(grad + sp.head);
  const uint32_t z[4] = {0u, 0u, 0u, 0u};
  for (int i = tid; i < sp.nvec; i += nthreads) store16(base + 16 * static_cast<size_t>(i), z);
}

}  // namespace ce
}  // namespace thr
