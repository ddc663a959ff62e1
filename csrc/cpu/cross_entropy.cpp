// CPU kernels of the weighted cross-entropy op family (python/thresher/ops/cross_entropy.py,
// backend "cpu"): the entry points of cpu/cross_entropy.h, bound by cpu/cross_entropy_bind.cpp.
// The per-element maths is common/math.h, shared with the CUDA kernels (cuda/cross_entropy.cu).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/math.h"
#include "cpu/clones.h"
#include "cpu/cross_entropy.h"

namespace {

constexpr long BLOCK = 2048;  // floats per online-lse block: 8 KiB, stays in L1 for its two sweeps

struct bf16_t { uint16_t v; };
struct f16_t { uint16_t v; };

// 8-wide float vectors (GCC/Clang vector extensions): one AVX2 register in the x86-64-v3
// clone, two SSE registers in the baseline clone. Explicit vectors instead of relying on the
// auto-vectoriser, which gives up on the exp polynomial inside a reduction.
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
constexpr long W = 8;

THR_AI float to_acc(float x) { return x; }
THR_AI double to_acc(double x) { return x; }
THR_AI float to_acc(bf16_t x) { return thr::bf16_to_float(x.v); }
THR_AI float to_acc(f16_t x) { return thr::half_to_float(x.v); }
THR_AI void store1(float* p, float v) { *p = v; }
THR_AI void store1(double* p, double v) { *p = v; }
THR_AI void store1(bf16_t* p, float v) { p->v = thr::float_to_bf16(v); }
THR_AI void store1(f16_t* p, float v) { p->v = thr::float_to_half(v); }

THR_AI v8f load8(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof v); return v; }
THR_AI v8f load8(const bf16_t* p) {
  v8h h;
  __builtin_memcpy(&h, p, sizeof h);
  return thr::bitcast<v8f>(__builtin_convertvector(h, v8u) << 16);
}
THR_AI v8f load8(const f16_t* p) {  // vector form of thr::half_to_float
  v8h h16;
  __builtin_memcpy(&h16, p, sizeof h16);
  v8u h = __builtin_convertvector(h16, v8u);
  v8u sign = (h & 0x8000u) << 16;
  v8u em = h & 0x7fffu;
  v8f mag = thr::bitcast<v8f>(em << 13) * 5.192296858534828e+33f;  // 2^112
  v8u infnan = (v8u)(em >= 0x7c00u) & 0x7f800000u;                   // mask -1/0
  return thr::bitcast<v8f>(thr::bitcast<v8u>(mag) | infnan | sign);
}
THR_AI void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }
THR_AI void store8(bf16_t* p, v8f v) {  // vector form of thr::float_to_bf16 (RNE, NaN kept)
  v8u u = thr::bitcast<v8u>(v);
  v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  v8u nan = (v8u)((u & 0x7fffffffu) > 0x7f800000u);
  v8u out = (nan & ((u >> 16) | 0x40u)) | (~nan & rounded);
  v8h h = __builtin_convertvector(out, v8h);
  __builtin_memcpy(p, &h, sizeof h);
}
THR_AI void store8(f16_t* p, v8f v) {  // fp16 is rare on CPUs: lane by lane
  for (int i = 0; i < 8; ++i) p[i].v = thr::float_to_half(v[i]);
}
THR_AI v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
THR_AI float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
THR_AI float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
THR_AI v8f vexp(v8f x) { return thr::exp_poly<v8f, v8u>(x); }

// Soft-capped loads (kCap: x -> cap tanh(x / cap), see thr::softcap_value); the kCap = false
// instantiations are the plain loads, so the uncapped loops are unchanged.
struct Cap {
  float cap, inv;
};
template <bool kCap, typename T>
THR_AI v8f load8c(const T* p, Cap c) {
  const v8f v = load8(p);
  return kCap ? thr::tanh_poly<v8f, v8u>(v * c.inv) * c.cap : v;
}
template <bool kCap, typename T>
THR_AI float load1c(const T* p, Cap c) {
  const float v = to_acc(*p);
  return kCap ? c.cap * thr::fast_tanhf(v * c.inv) : v;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Pass 1, one block of n values (in L1 between its sweeps): updates the running max / sum of
// exp and the sum of x.
template <typename U>
THR_AI void block_lse(const U* x, long n, bool want_sum_x, float& run_m, float& run_s,
                      double& sx_total) {
  const long nv = n - n % W;
  v8f vm = v8f{} + kNegInf;
  for (long j = 0; j < nv; j += W) vm = vmax(vm, load8(x + j));
  float m = hmax(vm);
  for (long j = nv; j < n; ++j) m = std::max(m, to_acc(x[j]));
  if (want_sum_x) {
    v8f vx = v8f{};
    for (long j = 0; j < nv; j += W) vx += load8(x + j);
    float sx = hsum(vx);
    for (long j = nv; j < n; ++j) sx += to_acc(x[j]);
    sx_total += sx;
  }
  if (m == kNegInf) return;  // an all -inf block adds nothing (and exp(-inf - -inf) is NaN)
  v8f vs = v8f{};
  for (long j = 0; j < nv; j += W) vs += vexp(load8(x + j) - m);
  float s = hsum(vs);
  for (long j = nv; j < n; ++j) s += thr::fast_expf(to_acc(x[j]) - m);
  if (m > run_m) {
    run_s = run_s * thr::fast_expf(run_m - m) + s;  // run_s == 0 while run_m == -inf
    run_m = m;
  } else {
    run_s += s * thr::fast_expf(m - run_m);
  }
}

// Pass 1 for float/bf16/fp16 rows: returns lse; sum of x into *sum_x when want_sum_x. With a
// soft-cap each block is capped once into a float buffer (one tanh per element), which the
// block's sweeps then read instead of the row.
template <bool kCap, typename T>
THR_AI float row_lse(const T* row, long V, bool want_sum_x, double* sum_x, Cap cap) {
  float run_m = kNegInf, run_s = 0.0f;
  double sx_total = 0.0;
  alignas(32) float buf[kCap ? BLOCK : 1];
  for (long j0 = 0; j0 < V; j0 += BLOCK) {
    const long n = std::min(BLOCK, V - j0);
    if (kCap) {
      const long nv = n - n % W;
      for (long j = 0; j < nv; j += W) store8(buf + j, load8c<true>(row + j0 + j, cap));
      for (long j = nv; j < n; ++j) buf[j] = load1c<true>(row + j0 + j, cap);
      block_lse(static_cast<const float*>(buf), n, want_sum_x, run_m, run_s, sx_total);
    } else {
      block_lse(row + j0, n, want_sum_x, run_m, run_s, sx_total);
    }
  }
  *sum_x = sx_total;
  return run_m + static_cast<float>(std::log(static_cast<double>(run_s)));  // one log per row
}

// float64 rows (gradcheck and ground-truth use; exactness over speed): scalar std::exp.
THR_AI double cap64(double x, double cap) { return cap == 0.0 ? x : cap * std::tanh(x / cap); }

THR_AI double row_lse64(const double* row, long V, bool want_sum_x, double* sum_x, double cap) {
  double m = -std::numeric_limits<double>::infinity(), s = 0.0, sx = 0.0;
  for (long j = 0; j < V; ++j) m = std::max(m, cap64(row[j], cap));
  if (want_sum_x)
    for (long j = 0; j < V; ++j) sx += cap64(row[j], cap);
  *sum_x = sx;
  if (m == -std::numeric_limits<double>::infinity()) return m;
  for (long j = 0; j < V; ++j) s += std::exp(cap64(row[j], cap) - m);
  return m + std::log(s);
}

// Streaming (non-temporal) stores for gradients far larger than the caches: a normal store
// first reads the line it writes (read-for-ownership), so writing the (N, V) gradient would
// cost a hidden extra read of N*V*elem bytes. SSE2 is in every x86-64, so both ISA clones
// have it. Not used when grad aliases the logits (the fused linear op): there the gradient
// is consumed straight from cache by the next GEMM.
#if defined(__SSE2__)
THR_AI void stream8(float* p, v8f v) {
  __m128 a, b;
  __builtin_memcpy(&a, &v, 16);
  __builtin_memcpy(&b, reinterpret_cast<const char*>(&v) + 16, 16);
  _mm_stream_ps(p, a);
  _mm_stream_ps(p + 4, b);
}
template <typename H>  // bf16_t / f16_t: eight 16-bit values = one 16-byte store
THR_AI void stream8(H* p, v8f v) {
  H tmp[8];
  store8(tmp, v);
  __m128i h;
  __builtin_memcpy(&h, tmp, 16);
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
}
constexpr bool kCanStream = true;
#else
template <typename T> THR_AI void stream8(T* p, v8f v) { store8(p, v); }
constexpr bool kCanStream = false;
#endif

// Pass 2: g_j = coef (p_j (1 + 2 zl lse) - eps/V), minus coef (1 - eps) at the target
// (times the soft-cap slope 1 - (x_j/cap)^2 of the capped x_j when kCap).
// The target's term is folded into the vector that holds it, so the row is written exactly
// once, front to back; with grad aliasing row, each vector is loaded before it is stored.
template <bool kCap, typename T>
THR_AI void row_grad(const T* row, T* grad, long V, long target, float lse, float coef, float eps,
                     float zl, bool stream, Cap cap) {
  const thr::GradCoef c = thr::grad_coef(lse, coef, eps, zl, V);
  auto scalar = [&](long j) __attribute__((always_inline)) {
    const float x = load1c<kCap>(row + j, cap);
    const float g = j == target ? thr::grad_target_value(x, c) : thr::grad_value(x, c);
    store1(grad + j, kCap ? g * thr::softcap_slope(x, cap.inv) : g);
  };
  auto vec = [&](long j) __attribute__((always_inline)) {  // thr::grad_value, 8 lanes at once
    const v8f x = load8c<kCap>(row + j, cap);
    v8f v = vexp(x - c.lse) * c.scale_p - c.smooth;
    if (target >= j && target < j + W) v[target - j] -= c.target_shift;
    if (kCap) {
      const v8f t = x * cap.inv;
      v = v * (1.0f - t * t);
    }
    return v;
  };
  long j = 0;
  if (stream) {
    while (j < V && (reinterpret_cast<uintptr_t>(grad + j) & 15)) scalar(j++);
    for (; j + W <= V; j += W) stream8(grad + j, vec(j));
#if defined(__SSE2__)
    _mm_sfence();  // streamed lines are visible before the row is reported done
#endif
  } else {
    for (; j + W <= V; j += W) store8(grad + j, vec(j));
  }
  for (; j < V; ++j) scalar(j);
}

THR_AI void row_grad64(const double* row, double* grad, long V, long target, double lse,
                       double coef, double eps, double zl, double cap) {
  const double scale_p = coef * (1.0 + 2.0 * zl * lse);
  const double smooth = coef * eps / static_cast<double>(V);
  for (long j = 0; j < V; ++j) {
    const double x = cap64(row[j], cap);  // read before grad[j] (may alias) is written
    double g = std::exp(x - lse) * scale_p - smooth - (j == target ? coef * (1.0 - eps) : 0.0);
    if (cap != 0.0) g *= 1.0 - (x / cap) * (x / cap);
    grad[j] = g;
  }
}

// Dispatch of the two row functions on the soft-cap (a compile-time branch per row).
template <typename T>
THR_AI float row_lse_any(const T* row, long V, bool want_sum_x, double* sum_x, float cap) {
  const Cap c{cap, cap == 0.0f ? 0.0f : 1.0f / cap};
  return cap != 0.0f ? row_lse<true>(row, V, want_sum_x, sum_x, c)
                     : row_lse<false>(row, V, want_sum_x, sum_x, c);
}
THR_AI double row_lse_any(const double* row, long V, bool want_sum_x, double* sum_x, double cap) {
  return row_lse64(row, V, want_sum_x, sum_x, cap);
}
template <typename T>
THR_AI void row_grad_any(const T* row, T* grad, long V, long target, float lse, float coef,
                         float eps, float zl, bool stream, float cap) {
  const Cap c{cap, cap == 0.0f ? 0.0f : 1.0f / cap};
  if (cap != 0.0f) row_grad<true>(row, grad, V, target, lse, coef, eps, zl, stream, c);
  else row_grad<false>(row, grad, V, target, lse, coef, eps, zl, stream, c);
}
THR_AI void row_grad_any(const double* row, double* grad, long V, long target, double lse,
                         double coef, double eps, double zl, bool, double cap) {
  row_grad64(row, grad, V, target, lse, coef, eps, zl, cap);
}
// The loss's target logit, capped like the rest of the row.
template <typename T>
THR_AI float target_logit(const T* row, long t, float cap) {
  return cap != 0.0f ? load1c<true>(row + t, Cap{cap, 1.0f / cap}) : to_acc(row[t]);
}
THR_AI double target_logit(const double* row, long t, double cap) { return cap64(row[t], cap); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Everything one kernel call needs, passed to the per-row functions by pointer.
template <typename T>
struct Rows {
  using A = typename AccOf<T>::type;
  const T* x;
  long N, V, stride;
  const int64_t* target;
  A* lse;         // forward: out, backward: in
  A* loss;        // forward only
  T* grad;        // nullptr: no gradient
  long grad_stride;
  const A* coef;  // per-row gradient coefficient
  long ignore_index;
  A eps, zl, cap;  // cap: soft-cap, 0 = off
  bool stream;
};

// One row of the forward (+ fused gradient when grad is set) or of the backward.
// Forward, per row of logits x (length V), with per-row gradient coefficient c:
//   pass 1 (reads the row from DRAM once): blockwise online log-sum-exp (and sum x for label
//           smoothing). A block of BLOCK floats (8 KiB) stays in L1 between its max and its
//           sum-of-exp sweep, so exp is evaluated once per element.
//   pass 2 (only when a gradient is wanted): g_j = c (p_j (1 + 2 zl lse) - eps/V), minus
//           c (1 - eps) at the target. The row was just read, so it is re-read from L2
//           (V = 128256 fp32 is 501 KiB, the size of one core's L2 here), and g is written once.
// Fusing the gradient into the forward is what makes fwd+bwd one DRAM read of the logits and
// one DRAM write of the gradient (eager PyTorch moves ~6 full-size tensors for the same).
// grad may alias logits (the fused linear op writes the gradient over its logits chunk):
// pass 2 reads x_j before writing g_j and the target logit is read before the sweep.
template <typename T>
THR_AI void row_forward(const Rows<T>& a, long i) {
  using A = typename AccOf<T>::type;
  const T* row = a.x + i * a.stride;
  T* grad = a.grad ? a.grad + i * a.grad_stride : nullptr;
  const long t = a.target[i];
  if (t == a.ignore_index) {
    a.lse[i] = 0;
    a.loss[i] = 0;
    if (grad) std::fill(grad, grad + a.V, T{});
    return;
  }
  double sum_x = 0.0;
  const A lse = row_lse_any(row, a.V, a.eps != A(0), &sum_x, a.cap);
  a.lse[i] = lse;
  // A target outside [0, V) (possible only where the Python checks are skipped: inside a
  // torch.compile graph) is never read: NaN loss, and a gradient row without a target term.
  const A x_t = t >= 0 && t < a.V ? target_logit(row, t, a.cap)
                                  : std::numeric_limits<A>::quiet_NaN();
  a.loss[i] = static_cast<A>(thr::ce_row_loss(lse, x_t, sum_x, a.V, a.eps, a.zl));
  if (grad) row_grad_any(row, grad, a.V, t, lse, a.coef[i], a.eps, a.zl, a.stream, a.cap);
}

template <typename T>
THR_AI void row_backward(const Rows<T>& a, long i) {
  using A = typename AccOf<T>::type;
  const T* row = a.x + i * a.stride;
  T* grad = a.grad + i * a.grad_stride;
  const long t = a.target[i];
  if (t == a.ignore_index || a.coef[i] == A(0)) {
    std::fill(grad, grad + a.V, T{});
    return;
  }
  row_grad_any(row, grad, a.V, t, a.lse[i], a.coef[i], a.eps, a.zl, a.stream, a.cap);
}

// Concrete, ISA-cloned row functions (target_clones needs non-template functions): each is
// compiled twice (x86-64-v3 = AVX2+FMA, and baseline x86-64) and picked at load time by the
// ifunc resolver, so a portable build still runs AVX2 code.
#define THR_DEFINE_ROWS(T, NAME)                                                   \
  THR_CLONES void forward_##NAME(const Rows<T>& a, long i) { row_forward<T>(a, i); } \
  THR_CLONES void backward_##NAME(const Rows<T>& a, long i) { row_backward<T>(a, i); }
THR_DEFINE_ROWS(float, f32)
THR_DEFINE_ROWS(double, f64)
THR_DEFINE_ROWS(bf16_t, bf16)
THR_DEFINE_ROWS(f16_t, f16)

// Rows are split across OpenMP threads (count from torch.get_num_threads(), passed in).
template <typename T>
void run_rows(void (*fn)(const Rows<T>&, long), const Rows<T>& a, int threads) {
  // Rows cost the same (V elements each), so a static split balances; ignored rows are rare.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long i = 0; i < a.N; ++i) fn(a, i);
}

template <typename T>
Rows<T> make_rows(uintptr_t logits, long N, long V, long stride, uintptr_t target, uintptr_t lse,
                  uintptr_t loss, uintptr_t grad, long grad_stride, uintptr_t coef,
                  long ignore_index, double eps, double zl, double cap) {
  using A = typename AccOf<T>::type;
  // Stream only a gradient that is separate from the logits and larger than any L3 (32 MiB).
  const bool big = static_cast<double>(N) * V * sizeof(T) >= 32.0 * (1 << 20);
  return Rows<T>{reinterpret_cast<const T*>(logits), N, V, stride,
                 reinterpret_cast<const int64_t*>(target), reinterpret_cast<A*>(lse),
                 reinterpret_cast<A*>(loss), reinterpret_cast<T*>(grad), grad_stride,
                 reinterpret_cast<const A*>(coef), ignore_index, A(eps), A(zl), A(cap),
                 kCanStream && big && grad != logits};
}

template <typename T>
void run_typed(void (*fn)(const Rows<T>&, long), uintptr_t logits, long N, long V, long stride,
                   uintptr_t target, uintptr_t lse, uintptr_t loss, uintptr_t grad,
                   long grad_stride, uintptr_t coef, long ii, double eps, double zl,
                   double cap, int threads) {
  run_rows<T>(fn, make_rows<T>(logits, N, V, stride, target, lse, loss, grad, grad_stride, coef,
                               ii, eps, zl, cap), threads);
}

}  // namespace

void ce_forward_cpu(uintptr_t logits, long N, long V, long stride, int dtype, uintptr_t target,
                    uintptr_t lse, uintptr_t loss, uintptr_t grad, long grad_stride,
                    uintptr_t coef, long ii, double eps, double zl, double cap, int threads) {
  if (grad != 0 && coef == 0) throw std::invalid_argument("ce_forward: grad needs coef");
  switch (dtype) {
    case thr::kFloat32: return run_typed<float>(forward_f32, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ii, eps, zl, cap, threads);
    case thr::kFloat64: return run_typed<double>(forward_f64, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ii, eps, zl, cap, threads);
    case thr::kBFloat16: return run_typed<bf16_t>(forward_bf16, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ii, eps, zl, cap, threads);
    case thr::kFloat16: return run_typed<f16_t>(forward_f16, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ii, eps, zl, cap, threads);
  }
  throw std::invalid_argument("ce_forward: unsupported dtype code");
}

void ce_backward_cpu(uintptr_t logits, long N, long V, long stride, int dtype, uintptr_t target,
                     uintptr_t lse, uintptr_t coef, uintptr_t grad, long grad_stride, long ii,
                     double eps, double zl, double cap, int threads) {
  // Same row set-up as the forward; backward rows read lse instead of writing it.
  switch (dtype) {
    case thr::kFloat32: return run_typed<float>(backward_f32, logits, N, V, stride, target, lse, 0, grad, grad_stride, coef, ii, eps, zl, cap, threads);
    case thr::kFloat64: return run_typed<double>(backward_f64, logits, N, V, stride, target, lse, 0, grad, grad_stride, coef, ii, eps, zl, cap, threads);
    case thr::kBFloat16: return run_typed<bf16_t>(backward_bf16, logits, N, V, stride, target, lse, 0, grad, grad_stride, coef, ii, eps, zl, cap, threads);
    case thr::kFloat16: return run_typed<f16_t>(backward_f16, logits, N, V, stride, target, lse, 0, grad, grad_stride, coef, ii, eps, zl, cap, threads);
  }
  throw std::invalid_argument("ce_backward: unsupported dtype code");
}
