// CPU kernels of the low-rank Adam op family (python/thresher/ops/lowrank.py, backend "cpu"):
// the entry points of cpu/lowrank.h (what each computes), bound by cpu/lowrank_bind.cpp. The
// per-element maths is common/lowrank.h, shared with the CUDA kernels (cuda/lowrank.cu).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/lowrank.h"
#include "cpu/clones.h"
#include "cpu/lowrank.h"

namespace {

using thr::lowrank::AdamCoef;

// Layout of lowrank_moments: R, m, v share one strided 2-D layout (rows = the rank
// dimension, cols = the other one). Side "left" is R (r x q) row-major: col_stride 1, so
// each thread takes a block of columns and sweeps the rows with contiguous vector loads,
// accumulating the column sums in registers/L1 (moments_col_block). Side "right" is R (p x r)
// row-major seen transposed: row_stride 1, each column is a contiguous run of r elements (a
// dot-product style reduction per column: moments_column).
//
// Columns per thread block of the "left" layout: 512 floats = 2 KiB per row slice of each
// of the 3 tensors, and the column sums (2 KiB) stay in L1.
constexpr long COL_BLOCK = 512;

template <typename T>
struct Moments {
  T* r;  // in: projected gradient, out: normalised direction
  T* m;
  T* v;
  long rows, cols, row_stride, col_stride;
  T* dsum;  // nullptr or cols entries: sum over rows of v_hat
  AdamCoef<T> c;
};

template <typename T>
THR_AI void moments_col_block(const Moments<T>& a, long j0, long j1) {
  // col_stride == 1: rows swept top to bottom, columns [j0, j1) contiguous in each row.
  T acc[COL_BLOCK];
  const long n = j1 - j0;
  for (long j = 0; j < n; ++j) acc[j] = T(0);
  for (long i = 0; i < a.rows; ++i) {
    T* __restrict__ r = a.r + i * a.row_stride + j0;
    T* __restrict__ m = a.m + i * a.row_stride + j0;
    T* __restrict__ v = a.v + i * a.row_stride + j0;
#pragma omp simd
    for (long j = 0; j < n; ++j) {
      T mj = m[j], vj = v[j], vh;
      r[j] = thr::lowrank::adam_elem<T>(r[j], mj, vj, a.c, &vh);
      m[j] = mj;
      v[j] = vj;
      acc[j] += vh;
    }
  }
  if (a.dsum)
    for (long j = 0; j < n; ++j) a.dsum[j0 + j] = acc[j];
}

template <typename T>
THR_AI void moments_column(const Moments<T>& a, long j) {
  // row_stride == 1: column j is a contiguous run of `rows` elements.
  T* __restrict__ r = a.r + j * a.col_stride;
  T* __restrict__ m = a.m + j * a.col_stride;
  T* __restrict__ v = a.v + j * a.col_stride;
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (long i = 0; i < a.rows; ++i) {
    T mi = m[i], vi = v[i], vh;
    r[i] = thr::lowrank::adam_elem<T>(r[i], mi, vi, a.c, &vh);
    m[i] = mi;
    v[i] = vi;
    acc += vh;
  }
  if (a.dsum) a.dsum[j] = acc;
}

template <typename T>
THR_AI void moments_generic(const Moments<T>& a, long j) {
  T acc = T(0);
  for (long i = 0; i < a.rows; ++i) {
    const long o = i * a.row_stride + j * a.col_stride;
    T mi = a.m[o], vi = a.v[o], vh;
    a.r[o] = thr::lowrank::adam_elem<T>(a.r[o], mi, vi, a.c, &vh);
    a.m[o] = mi;
    a.v[o] = vi;
    acc += vh;
  }
  if (a.dsum) a.dsum[j] = acc;
}

// The loops are plain C++ that GCC vectorises (-O3 -fno-math-errno turns sqrt into vsqrtps);
// they are compiled for x86-64-v3 (AVX2+FMA) and baseline x86-64 and picked at load time.
// kind 0: column blocks (col_stride 1); 1: contiguous columns (row_stride 1); 2: generic.
#define THR_DEFINE_MOMENTS(T, NAME)                                                        \
  THR_CLONES void moments_##NAME(const Moments<T>& a, long task, int kind) {               \
    if (kind == 0) {                                                                       \
      const long j0 = task * COL_BLOCK;                                                    \
      moments_col_block<T>(a, j0, std::min(a.cols, j0 + COL_BLOCK));                       \
    } else if (kind == 1) {                                                                \
      moments_column<T>(a, task);                                                          \
    } else {                                                                               \
      moments_generic<T>(a, task);                                                         \
    }                                                                                      \
  }
THR_DEFINE_MOMENTS(float, f32)
THR_DEFINE_MOMENTS(double, f64)

template <typename T>
void run_moments(void (*fn)(const Moments<T>&, long, int), uintptr_t r, uintptr_t m, uintptr_t v,
                 long rows, long cols, long row_stride, long col_stride, uintptr_t dsum,
                 const AdamCoef<T>& c, int threads) {
  const Moments<T> a{reinterpret_cast<T*>(r), reinterpret_cast<T*>(m), reinterpret_cast<T*>(v),
                     rows, cols, row_stride, col_stride, reinterpret_cast<T*>(dsum), c};
  const int kind = col_stride == 1 ? 0 : (row_stride == 1 ? 1 : 2);
  const long tasks = kind == 0 ? (cols + COL_BLOCK - 1) / COL_BLOCK : cols;
  // The low-rank tensors are small (256 x 5632 = 1.4M elements: ~5 ms on one core), so one
  // thread unless there are >= 4M elements. Waking a second OpenMP thread costs ~us on an
  // idle machine, but measured here, with the 2 cores shared by many processes, a parallel
  // region waits for its descheduled partner: 1024 x 128 took 0.27 ms on one thread and
  // 18.7 ms on two; 256 x 5632 5.5 ms vs 16.6 ms.
  const int nt = static_cast<double>(rows) * cols < 4194304.0 ? 1 : threads;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (long t = 0; t < tasks; ++t) fn(a, t, kind);
}

template <typename T>
struct FullRank {
  T* p;
  const T* g;
  const T* w;
  long rows, cols, p_stride, g_stride;
  int axis;  // 0: w per column (length cols), 1: w per row (length rows)
};

template <typename T>
THR_AI void fullrank_row(const FullRank<T>& a, long i) {
  T* __restrict__ p = a.p + i * a.p_stride;
  const T* __restrict__ g = a.g + i * a.g_stride;
  if (a.axis == 0) {
    const T* __restrict__ w = a.w;
#pragma omp simd
    for (long j = 0; j < a.cols; ++j) p[j] -= g[j] * w[j];
  } else {
    const T wi = a.w[i];
#pragma omp simd
    for (long j = 0; j < a.cols; ++j) p[j] -= g[j] * wi;
  }
}

#define THR_DEFINE_FULLRANK(T, NAME) \
  THR_CLONES void fullrank_##NAME(const FullRank<T>& a, long i) { fullrank_row<T>(a, i); }
THR_DEFINE_FULLRANK(float, f32)
THR_DEFINE_FULLRANK(double, f64)

template <typename T>
void run_fullrank(void (*fn)(const FullRank<T>&, long), uintptr_t p, uintptr_t g, uintptr_t w,
                  long rows, long cols, long p_stride, long g_stride, int axis, int threads) {
  const FullRank<T> a{reinterpret_cast<T*>(p), reinterpret_cast<const T*>(g),
                      reinterpret_cast<const T*>(w), rows, cols, p_stride, g_stride, axis};
  // Full-size tensors: parallel from 1M elements (see run_moments for why not below).
  const int nt = static_cast<double>(rows) * cols < 1048576.0 ? 1 : threads;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (long i = 0; i < rows; ++i) fn(a, i);
}

}  // namespace

void lowrank_moments_cpu(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols,
                         long row_stride, long col_stride, int dtype, double beta1, double beta2,
                         double bc1, double bc2, double eps, uintptr_t dsum, int threads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("lowrank_moments: negative shape");
  if (rows == 0 || cols == 0) return;
  switch (dtype) {
    case thr::kFloat32:
      return run_moments<float>(moments_f32, r, m, v, rows, cols, row_stride, col_stride, dsum,
                                thr::lowrank::adam_coef<float>(beta1, beta2, bc1, bc2, eps), threads);
    case thr::kFloat64:
      return run_moments<double>(moments_f64, r, m, v, rows, cols, row_stride, col_stride, dsum,
                                 thr::lowrank::adam_coef<double>(beta1, beta2, bc1, bc2, eps),
                                 threads);
  }
  throw std::invalid_argument("lowrank_moments: unsupported dtype code " + std::to_string(dtype) +
                              " (the CPU kernel takes float32 and float64)");
}

void lowrank_fullrank_update_cpu(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols,
                                 long p_stride, long g_stride, int dtype, int axis, int threads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("lowrank_fullrank_update: negative shape");
  if (axis != 0 && axis != 1) throw std::invalid_argument("lowrank_fullrank_update: axis must be 0 or 1");
  if (rows == 0 || cols == 0) return;
  switch (dtype) {
    case thr::kFloat32:
      return run_fullrank<float>(fullrank_f32, p, g, w, rows, cols, p_stride, g_stride, axis, threads);
    case thr::kFloat64:
      return run_fullrank<double>(fullrank_f64, p, g, w, rows, cols, p_stride, g_stride, axis, threads);
  }
  throw std::invalid_argument("lowrank_fullrank_update: unsupported dtype code " +
                              std::to_string(dtype) + " (the CPU kernel takes float32 and float64)");
}
