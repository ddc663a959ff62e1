// CUDA kernels of the weighted cross-entropy op family (python/thresher/ops/cross_entropy.py,
// backend "cuda"): the launchers of cuda/cross_entropy.h, bound by cuda/cross_entropy_bind.cpp;
// the CPU twin is cpu/cross_entropy.cpp. The per-thread sweeps and all per-element maths are
// cuda/cross_entropy_device.cuh and common/ (host-tested); this file adds the block reduction
// and the launches.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cross_entropy.h"
#include "common/math.h"
#include "cuda/cross_entropy.h"
#include "cuda/cross_entropy_device.cuh"
#include "cuda/runtime.h"

namespace {

using thr::LseState;
using thr::ce::Elem;
using thr::ce::Partial;

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ Partial shfl_xor(const Partial& p, int off) {
  Partial q;
  q.lse.m = __shfl_xor_sync(kFull, p.lse.m, off);
  q.lse.s = __shfl_xor_sync(kFull, p.lse.s, off);
  q.sum_x = __shfl_xor_sync(kFull, p.sum_x, off);
  return q;
}

__device__ __forceinline__ Partial warp_reduce(Partial p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) p = thr::ce::merge(p, shfl_xor(p, off));
  return p;
}

struct BlockScratch {
  LseState lse[32];
  double sum_x[32];
  float row_lse;
};

// Block-wide merge of the threads' partials; the result is valid in thread 0. blockDim.x is a
// multiple of 32. Ends with a barrier-free warp 0, so the caller must __syncthreads() before
// scratch is written again (the broadcast below does).
__device__ __forceinline__ Partial block_reduce(Partial p, BlockScratch& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  p = warp_reduce(p);
  if (lane == 0) {
    sh.lse[warp] = p.lse;
    sh.sum_x[warp] = p.sum_x;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    Partial q{LseState{thr::ce::neg_inf(), 0.0f}, 0.0};
    if (lane < nwarps) q = Partial{sh.lse[lane], sh.sum_x[lane]};
    p = warp_reduce(q);
  }
  return p;
}

// One block per row (a grid-stride loop over rows past 2^31 - 1 rows).
//   forward:  pass 1 reads the row once with 16-byte loads and keeps a per-thread online
//             log-sum-exp (and sum x for label smoothing); a warp-shuffle + shared-memory
//             reduction gives the row's lse, and thread 0 writes lse and the loss.
//             Pass 2 (only when a gradient is wanted) re-reads the row, mostly from L2, and
//             writes coef * dl/dx; thread 0 then rewrites the target element.
//   backward: pass 2 only, from the saved lse.
// grad may alias logits (the fused linear op overwrites its logits chunk): each element is
// read before it is written by the thread that owns it, and x[target] is read before the
// block barrier that precedes any write.
template <int D>
__global__ void __launch_bounds__(thr::ce::kMaxThreads)
ce_forward_kernel(const typename Elem<D>::S* logits, long N, int V, long stride,
                  const int64_t* __restrict__ target, float* __restrict__ lse_out,
                  float* __restrict__ loss_out, typename Elem<D>::S* grad, long grad_stride,
                  const float* __restrict__ coef, long ignore_index, double eps, double zl,
                  float cap) {
  using E = Elem<D>;
  using S = typename E::S;
  __shared__ BlockScratch sh;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (long row = blockIdx.x; row < N; row += gridDim.x) {
    const S* x = logits + row * stride;
    S* g = grad ? grad + row * grad_stride : nullptr;
    const int64_t t = target[row];
    if (t == ignore_index) {  // uniform over the block
      if (tid == 0) {
        lse_out[row] = 0.0f;
        loss_out[row] = 0.0f;
      }
      if (g) thr::ce::row_zero<D>(g, V, tid, nthreads);
      continue;
    }
    const bool t_ok = t >= 0 && t < V;  // validated in Python; never read out of bounds
    float x_t = 0.0f;
    const float inv = cap == 0.0f ? 0.0f : 1.0f / cap;
    if (tid == 0) x_t = t_ok ? thr::softcap_value(E::to_float(x[t]), cap, inv) : thr::ce::quiet_nan();

    const Partial p =
        block_reduce(thr::ce::row_partial<D>(x, V, tid, nthreads, eps != 0.0, cap), sh);
    if (tid == 0) {
      const float lse = thr::ce::lse_value(p.lse);
      sh.row_lse = lse;
      lse_out[row] = lse;
      loss_out[row] = static_cast<float>(thr::ce_row_loss(lse, x_t, p.sum_x, V, eps, zl));
    }
    __syncthreads();
    if (g) {  // uniform
      const thr::GradCoef c = thr::grad_coef(sh.row_lse, coef[row], eps, zl, V, cap);
      thr::ce::row_grad<D>(x, g, V, tid, nthreads, c);
      __syncthreads();  // the owner's plain value is written before the target's
      if (tid == 0 && t_ok) g[t] = E::from_float(thr::capped_grad_target_value(x_t, c));
    }
  }
}

template <int D>
__global__ void __launch_bounds__(thr::ce::kMaxThreads)
ce_backward_kernel(const typename Elem<D>::S* logits, long N, int V, long stride,
                   const int64_t* __restrict__ target, const float* __restrict__ lse_in,
                   const float* __restrict__ coef, typename Elem<D>::S* grad, long grad_stride,
                   long ignore_index, double eps, double zl, float cap) {
  using E = Elem<D>;
  using S = typename E::S;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (long row = blockIdx.x; row < N; row += gridDim.x) {
    const S* x = logits + row * stride;
    S* g = grad + row * grad_stride;
    const int64_t t = target[row];
    const float cf = coef[row];
    if (t == ignore_index || cf == 0.0f) {  // uniform over the block
      thr::ce::row_zero<D>(g, V, tid, nthreads);
      continue;
    }
    const bool t_ok = t >= 0 && t < V;
    float x_t = 0.0f;
    const thr::GradCoef c = thr::grad_coef(lse_in[row], cf, eps, zl, V, cap);
    if (tid == 0 && t_ok) x_t = thr::softcap_value(E::to_float(x[t]), c.cap, c.inv_cap);
    __syncthreads();  // x[target] is read before anyone writes (grad may alias logits)
    thr::ce::row_grad<D>(x, g, V, tid, nthreads, c);
    __syncthreads();
    if (tid == 0 && t_ok) g[t] = E::from_float(thr::capped_grad_target_value(x_t, c));
  }
}

// Makes the logits' device current for the launch (the stream belongs to it), restoring the
// caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
      cudaGetLastError();  // not a CUDA pointer: leave the error to the launch
      return;
    }
    int cur = -1;
    if (attr.type == cudaMemoryTypeDevice && cudaGetDevice(&cur) == cudaSuccess &&
        cur != attr.device && cudaSetDevice(attr.device) == cudaSuccess) {
      prev_ = cur;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

void check_shape(const char* what, long N, long V) {
  if (N < 0 || V < 1 || V > INT_MAX) {
    throw std::invalid_argument(std::string(what) + ": need n_rows >= 0 and 1 <= vocab < 2^31, got " +
                                std::to_string(N) + ", " + std::to_string(V));
  }
}

unsigned grid_for(long N) { return static_cast<unsigned>(N < INT_MAX ? N : INT_MAX); }

template <int D>
void forward_launch(uintptr_t logits, long N, long V, long stride, uintptr_t target, uintptr_t lse,
                    uintptr_t loss, uintptr_t grad, long grad_stride, uintptr_t coef,
                    long ignore_index, double eps, double zl, double cap, cudaStream_t stream) {
  using S = typename Elem<D>::S;
  const int threads = thr::ce::threads_for(V, Elem<D>::kVec);
  ce_forward_kernel<D><<<grid_for(N), threads, 0, stream>>>(
      reinterpret_cast<const S*>(logits), N, static_cast<int>(V), stride,
      reinterpret_cast<const int64_t*>(target), reinterpret_cast<float*>(lse),
      reinterpret_cast<float*>(loss), reinterpret_cast<S*>(grad), grad_stride,
      reinterpret_cast<const float*>(coef), ignore_index, eps, zl, static_cast<float>(cap));
  check_launch("ce_forward_cuda");
}

template <int D>
void backward_launch(uintptr_t logits, long N, long V, long stride, uintptr_t target,
                     uintptr_t lse, uintptr_t coef, uintptr_t grad, long grad_stride,
                     long ignore_index, double eps, double zl, double cap, cudaStream_t stream) {
  using S = typename Elem<D>::S;
  const int threads = thr::ce::threads_for(V, Elem<D>::kVec);
  ce_backward_kernel<D><<<grid_for(N), threads, 0, stream>>>(
      reinterpret_cast<const S*>(logits), N, static_cast<int>(V), stride,
      reinterpret_cast<const int64_t*>(target), reinterpret_cast<const float*>(lse),
      reinterpret_cast<const float*>(coef), reinterpret_cast<S*>(grad), grad_stride,
      ignore_index, eps, zl, static_cast<float>(cap));
  check_launch("ce_backward_cuda");
}

}  // namespace

void ce_forward_cuda(uintptr_t logits, long N, long V, long row_stride, int dtype,
                     uintptr_t target, uintptr_t lse, uintptr_t loss, uintptr_t grad,
                     long grad_row_stride, uintptr_t coef, long ignore_index, double eps,
                     double zl, double cap, uintptr_t stream) {
  check_shape("ce_forward_cuda", N, V);
  if (grad != 0 && coef == 0) throw std::invalid_argument("ce_forward_cuda: grad needs coef");
  if (N == 0) return;
  DeviceGuard guard(reinterpret_cast<const void*>(logits));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case thr::kFloat32: forward_launch<thr::kFloat32>(logits, N, V, row_stride, target, lse, loss, grad, grad_row_stride, coef, ignore_index, eps, zl, cap, s); break;
    case thr::kBFloat16: forward_launch<thr::kBFloat16>(logits, N, V, row_stride, target, lse, loss, grad, grad_row_stride, coef, ignore_index, eps, zl, cap, s); break;
    case thr::kFloat16: forward_launch<thr::kFloat16>(logits, N, V, row_stride, target, lse, loss, grad, grad_row_stride, coef, ignore_index, eps, zl, cap, s); break;
    default: bad_dtype("ce_forward_cuda", dtype);
  }
}

void ce_backward_cuda(uintptr_t logits, long N, long V, long row_stride, int dtype,
                      uintptr_t target, uintptr_t lse, uintptr_t coef, uintptr_t grad,
                      long grad_row_stride, long ignore_index, double eps, double zl,
                      double cap, uintptr_t stream) {
  check_shape("ce_backward_cuda", N, V);
  if (N == 0) return;
  DeviceGuard guard(reinterpret_cast<const void*>(logits));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case thr::kFloat32: backward_launch<thr::kFloat32>(logits, N, V, row_stride, target, lse, coef, grad, grad_row_stride, ignore_index, eps, zl, cap, s); break;
    case thr::kBFloat16: backward_launch<thr::kBFloat16>(logits, N, V, row_stride, target, lse, coef, grad, grad_row_stride, ignore_index, eps, zl, cap, s); break;
    case thr::kFloat16: backward_launch<thr::kFloat16>(logits, N, V, row_stride, target, lse, coef, grad, grad_row_stride, ignore_index, eps, zl, cap, s); break;
    default: bad_dtype("ce_backward_cuda", dtype);
  }
}
