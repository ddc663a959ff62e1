// Per-thread maths of the CUDA weighted cross-entropy kernels that needs no CUDA type: how a
// row splits into 16-byte vectors, the block size, and the online log-sum-exp partials that a
// block reduces. The sweeps over a row that use them are cuda/cross_entropy_device.cuh;
// tests/csrc/test_cuda_ce_host.py runs both on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math.h"

// Full unrolling of the short fixed-trip loops on the GPU (the host build only emulates).
#if defined(__CUDA_ARCH__)
#define THR_CE_UNROLL _Pragma("unroll")
#else
#define THR_CE_UNROLL
#endif

namespace thr {
namespace ce {

constexpr int kMaxThreads = 1024;  // the kernels' __launch_bounds__
constexpr int kUnroll = 4;         // 16-byte loads in flight per thread

THR_HD float neg_inf() { return bits_to_float(0xff800000u); }
THR_HD float quiet_nan() { return bits_to_float(0x7fc00000u); }

// ---- row split ------------------------------------------------------------------------------

// The row pointer's misalignment gives a scalar head (up to 16/sizeof(S) - 1
// elements) that brings the rest to a 16-byte boundary, then whole 16-byte vectors, then a
// scalar tail.
struct RowSplit {
  int head;        // scalar elements [0, head)
  int nvec;        // 16-byte vectors from element head on
  int tail_start;  // scalar elements [tail_start, V)
};

template <typename S>
THR_HD RowSplit split_row(const S* p, int V) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(S));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int head;
  if (a % sizeof(S) != 0) {
    head = V;  // not even element-aligned (no PyTorch tensor is): all scalar
  } else {
    const int mis = static_cast<int>((a & 15u) / sizeof(S));
    head = mis ? kVec - mis : 0;
    head = head < V ? head : V;
  }
  const int nvec = (V - head) / kVec;
  return RowSplit{head, nvec, head + nvec * kVec};
}

// Threads per block for a row of V elements: about 16 vectors per thread, 128 to 1024 threads.
// Large rows get the whole 1024 so that one row per SM is enough to keep HBM busy; that keeps
// the rows between their two sweeps few enough to stay in L2.
THR_HD int threads_for(long V, int vec) {
  long per = (V / vec + 15) / 16;
  int t = 128;
  while (t < kMaxThreads && t < per) t *= 2;
  return t;
}

// ---- pass 1: online log-sum-exp (and sum of x for label smoothing) --------------------------

struct Partial {
  LseState lse;  // running max m and sum of exp(x - m); {-inf, 0} when empty
  double sum_x;
};

// Adds n values: one rescale of the running sum per group (only when the group raises the
// max), then one exp per value. A group whose max is -inf adds exp(-inf) = 0 terms: skipped.
template <int N>
THR_HD void push(Partial& p, const float (&f)[N], bool want_sum_x) {
  float vm = f[0];
THR_CE_UNROLL
  for (int k = 1; k < N; ++k) vm = f[k] > vm ? f[k] : vm;
  if (vm > p.lse.m) {
    p.lse.s = p.lse.s == 0.0f ? 0.0f : p.lse.s * fast_expf(p.lse.m - vm);
    p.lse.m = vm;
  }
  if (p.lse.m != neg_inf()) {
    float s = 0.0f;
THR_CE_UNROLL
    for (int k = 0; k < N; ++k) s += fast_expf(f[k] - p.lse.m);
    p.lse.s += s;
  }
  if (want_sum_x) {
    float sx = 0.0f;
THR_CE_UNROLL
    for (int k = 0; k < N; ++k) sx += f[k];
    p.sum_x += static_cast<double>(sx);
  }
}

THR_HD Partial merge(const Partial& a, const Partial& b) {
  return Partial{lse_merge(a.lse, b.lse), a.sum_x + b.sum_x};
}

// lse of the merged state (double log: once per row).
THR_HD float lse_value(LseState st) {
  return static_cast<float>(static_cast<double>(st.m) + log(static_cast<double>(st.s)));
}

}  // namespace ce
}  // namespace thr
