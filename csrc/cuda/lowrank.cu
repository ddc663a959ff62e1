// CUDA kernels of the low-rank Adam op family (python/thresher/ops/lowrank.py, backend
// "cuda"): the launchers of cuda/lowrank.h, bound by cuda/lowrank_bind.cpp; the CPU twin is
// cpu/lowrank.cpp, with the same raw-pointer interface and the same per-element maths
// (common/lowrank.h). The GEMMs (projection, and the back-projection with the GaLore update
// folded in as addmm's beta/alpha) are cuBLAS calls made by PyTorch. float32, bfloat16,
// float16 storage; fp32 maths.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/lowrank.h"
#include "common/math.h"
#include "cuda/lowrank.h"
#include "cuda/runtime.h"

namespace {

template <int D> struct St;
template <> struct St<thr::kFloat32> {
  using S = float;
  static __device__ __forceinline__ float load(const S* p) { return *p; }
  static __device__ __forceinline__ void store(S* p, float x) { *p = x; }
};
template <> struct St<thr::kBFloat16> {
  using S = uint16_t;
  static __device__ __forceinline__ float load(const S* p) { return thr::bf16_to_float(*p); }
  static __device__ __forceinline__ void store(S* p, float x) { *p = thr::float_to_bf16(x); }
};
template <> struct St<thr::kFloat16> {
  using S = uint16_t;
  static __device__ __forceinline__ float load(const S* p) { return thr::half_to_float(*p); }
  static __device__ __forceinline__ void store(S* p, float x) { *p = thr::float_to_half(x); }
};

constexpr int kThreads = 256;

// One thread per column of the (rows = rank) x cols low-rank tensor; it walks the column's
// `rows` elements, updates m and v, writes the direction over r and keeps the column's sum of
// v_hat in a register (LoRDO's D): no atomics, no shared memory. Side "left" (r x q row-major,
// col_stride 1): neighbouring threads read neighbouring addresses (coalesced). Side "right"
// (p x r seen transposed, row_stride 1) is strided, but the tensor is small (p r elements).
template <int D>
__global__ void __launch_bounds__(kThreads)
lowrank_moments_kernel(typename St<D>::S* r, typename St<D>::S* m, typename St<D>::S* v,
                       long rows, long cols, long rs, long cs, thr::lowrank::AdamCoef<float> c,
                       float* __restrict__ dsum) {
  using E = St<D>;
  for (long j = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; j < cols;
       j += static_cast<long>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (long i = 0; i < rows; ++i) {
      const long o = i * rs + j * cs;
      float mi = E::load(m + o), vi = E::load(v + o), vh;
      const float n = thr::lowrank::adam_elem<float>(E::load(r + o), mi, vi, c, &vh);
      E::store(m + o, mi);
      E::store(v + o, vi);
      E::store(r + o, n);
      acc += vh;
    }
    if (dsum) dsum[j] = acc;
  }
}

// LoRDO's full-rank term p[i, j] -= g[i, j] * w[j or i]: a grid-stride loop over rows x
// columns, one read of p and g and one write of p.
template <int D>
__global__ void __launch_bounds__(kThreads)
lowrank_fullrank_kernel(typename St<D>::S* p, const typename St<D>::S* __restrict__ g,
                        const float* __restrict__ w, long rows, long cols, long ps, long gs,
                        int axis) {
  using E = St<D>;
  const long n = rows * cols;
  for (long k = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<long>(gridDim.x) * blockDim.x) {
    const long i = k / cols, j = k - i * cols;
    const float wk = w[axis == 0 ? j : i];
    typename E::S* pp = p + i * ps + j;
    E::store(pp, E::load(pp) - E::load(g + i * gs + j) * wk);
  }
}

unsigned blocks_for(long n) {
  const long b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535L * 32 ? (b > 0 ? b : 1) : 65535L * 32);
}

template <int D>
void moments_launch(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols, long rs, long cs,
                    const thr::lowrank::AdamCoef<float>& c, uintptr_t dsum, cudaStream_t stream) {
  using S = typename St<D>::S;
  lowrank_moments_kernel<D><<<blocks_for(cols), kThreads, 0, stream>>>(
      reinterpret_cast<S*>(r), reinterpret_cast<S*>(m), reinterpret_cast<S*>(v), rows, cols, rs,
      cs, c, reinterpret_cast<float*>(dsum));
  check_launch("lowrank_moments_cuda");
}

template <int D>
void fullrank_launch(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols, long ps,
                     long gs, int axis, cudaStream_t stream) {
  using S = typename St<D>::S;
  lowrank_fullrank_kernel<D><<<blocks_for(rows * cols), kThreads, 0, stream>>>(
      reinterpret_cast<S*>(p), reinterpret_cast<const S*>(g), reinterpret_cast<const float*>(w),
      rows, cols, ps, gs, axis);
  check_launch("lowrank_fullrank_update_cuda");
}

}  // namespace

void lowrank_moments_cuda(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols,
                          long row_stride, long col_stride, int dtype, double beta1, double beta2,
                          double bc1, double bc2, double eps, uintptr_t dsum, uintptr_t stream) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("lowrank_moments: negative shape");
  check_dtype("lowrank_moments", dtype);
  if (rows == 0 || cols == 0) return;
  const auto c = thr::lowrank::adam_coef<float>(beta1, beta2, bc1, bc2, eps);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case thr::kFloat32: return moments_launch<thr::kFloat32>(r, m, v, rows, cols, row_stride, col_stride, c, dsum, s);
    case thr::kBFloat16: return moments_launch<thr::kBFloat16>(r, m, v, rows, cols, row_stride, col_stride, c, dsum, s);
    case thr::kFloat16: return moments_launch<thr::kFloat16>(r, m, v, rows, cols, row_stride, col_stride, c, dsum, s);
  }
}

void lowrank_fullrank_update_cuda(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols,
                                  long p_stride, long g_stride, int dtype, int axis,
                                  uintptr_t stream) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("lowrank_fullrank_update: negative shape");
  if (axis != 0 && axis != 1) throw std::invalid_argument("lowrank_fullrank_update: axis must be 0 or 1");
  check_dtype("lowrank_fullrank_update", dtype);
  if (rows == 0 || cols == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case thr::kFloat32: return fullrank_launch<thr::kFloat32>(p, g, w, rows, cols, p_stride, g_stride, axis, s);
    case thr::kBFloat16: return fullrank_launch<thr::kBFloat16>(p, g, w, rows, cols, p_stride, g_stride, axis, s);
    case thr::kFloat16: return fullrank_launch<thr::kFloat16>(p, g, w, rows, cols, p_stride, g_stride, axis, s);
  }
}
