// CPU kernels for the weighted cross-entropy op family (python/thresher/ops/cross_entropy.py).
//
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
//
// Rows are split across OpenMP threads (count from torch.get_num_threads(), passed in).
// The per-row functions are compiled twice (x86-64-v3 = AVX2+FMA, and baseline x86-64) and
// picked at load time by the ifunc resolver, so a portable build still runs AVX2 code.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "common/math.h"

namespace py = pybind11;

namespace {

#if defined(__x86_64__) && !defined(THRESHER_NO_CLONES)
#define THR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define THR_CLONES
#endif

constexpr long BLOCK = 2048;

struct bf16_t { uint16_t v; };
struct f16_t { uint16_t v; };

THR_HD float to_acc(float x) { return x; }
THR_HD double to_acc(double x) { return x; }
THR_HD float to_acc(bf16_t x) { return thr::bf16_to_float(x.v); }
THR_HD float to_acc(f16_t x) { return thr::half_to_float(x.v); }

template <typename T> THR_HD T from_acc(float x);
template <> THR_HD float from_acc<float>(float x) { return x; }
template <> THR_HD bf16_t from_acc<bf16_t>(float x) { return bf16_t{thr::float_to_bf16(x)}; }
template <> THR_HD f16_t from_acc<f16_t>(float x) { return f16_t{thr::float_to_half(x)}; }

THR_HD float exp_acc(float x) { return thr::fast_expf(x); }
THR_HD double exp_acc(double x) { return std::exp(x); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Converts block [j0, j0+n) of the row to the accumulation type. For float/double the row
// itself is returned (no copy).
template <typename T, typename A>
THR_HD const A* block_view(const T* row, long j0, long n, A* scratch) {
  if constexpr (std::is_same<T, A>::value) {
    (void)n; (void)scratch;
    return row + j0;
  } else {
#pragma omp simd
    for (long j = 0; j < n; ++j) scratch[j] = to_acc(row[j0 + j]);
    return scratch;
  }
}

// Pass 1: returns lse, and sum_x when want_sum_x.
template <typename T>
THR_HD typename AccOf<T>::type row_lse(const T* row, long V, bool want_sum_x, double* sum_x_out) {
  using A = typename AccOf<T>::type;
  alignas(64) A scratch[BLOCK];
  A run_m = -std::numeric_limits<A>::infinity();
  A run_s = 0;
  double sum_x = 0.0;
  for (long j0 = 0; j0 < V; j0 += BLOCK) {
    long n = std::min(BLOCK, V - j0);
    const A* x = block_view<T, A>(row, j0, n, scratch);
    A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
    for (long j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    if (m == -std::numeric_limits<A>::infinity()) continue;  // block adds exp(-inf) = 0
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (long j = 0; j < n; ++j) s += exp_acc(x[j] - m);
    if (want_sum_x) {
      A sx = 0;
#pragma omp simd reduction(+ : sx)
      for (long j = 0; j < n; ++j) sx += x[j];
      sum_x += static_cast<double>(sx);
    }
    if (m > run_m) {
      run_s = run_s * exp_acc(run_m - m) + s;  // run_s == 0 when run_m == -inf
      run_m = m;
    } else {
      run_s += s * exp_acc(m - run_m);
    }
  }
  *sum_x_out = sum_x;
  return run_m + std::log(run_s);
}

// Pass 2: writes the gradient row (may alias row).
template <typename T>
THR_HD void row_grad(const T* row, T* grad, long V, long target, typename AccOf<T>::type lse,
                     typename AccOf<T>::type coef, typename AccOf<T>::type eps,
                     typename AccOf<T>::type zl) {
  using A = typename AccOf<T>::type;
  const A x_t = to_acc(row[target]);
  const A scale_p = coef * (A(1) + A(2) * zl * lse);
  const A smooth = coef * eps / static_cast<A>(V);
  alignas(64) A scratch[BLOCK];
  for (long j0 = 0; j0 < V; j0 += BLOCK) {
    long n = std::min(BLOCK, V - j0);
    const A* x = block_view<T, A>(row, j0, n, scratch);
    T* g = grad + j0;
#pragma omp simd
    for (long j = 0; j < n; ++j) {
      A v = exp_acc(x[j] - lse) * scale_p - smooth;
      if constexpr (std::is_same<T, A>::value) g[j] = v; else g[j] = from_acc<T>(v);
    }
  }
  A v_t = exp_acc(x_t - lse) * scale_p - smooth - coef * (A(1) - eps);
  if constexpr (std::is_same<T, A>::value) grad[target] = v_t; else grad[target] = from_acc<T>(v_t);
}

template <typename T>
THR_HD void row_zero(T* grad, long V) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    std::fill(grad, grad + V, T(0));
  } else {
    std::fill(grad, grad + V, T{0});
  }
}

// One row of the forward (and fused gradient). Cloned per ISA.
template <typename T>
THR_HD void forward_row(const T* row, long V, long target, long ignore_index,
                        typename AccOf<T>::type* lse_out, typename AccOf<T>::type* loss_out,
                        T* grad, const typename AccOf<T>::type* coef, double eps, double zl) {
  using A = typename AccOf<T>::type;
  if (target == ignore_index) {
    *lse_out = 0;
    *loss_out = 0;
    if (grad) row_zero(grad, V);
    return;
  }
  double sum_x = 0.0;
  A lse = row_lse<T>(row, V, eps != 0.0, &sum_x);
  *lse_out = lse;
  *loss_out = static_cast<A>(thr::ce_row_loss(lse, to_acc(row[target]), sum_x, V, eps, zl));
  if (grad) row_grad<T>(row, grad, V, target, lse, *coef, A(eps), A(zl));
}

template <typename T>
THR_HD void backward_row(const T* row, long V, long target, long ignore_index,
                         typename AccOf<T>::type lse, typename AccOf<T>::type coef, T* grad,
                         double eps, double zl) {
  using A = typename AccOf<T>::type;
  if (target == ignore_index || coef == A(0)) {
    row_zero(grad, V);
    return;
  }
  row_grad<T>(row, grad, V, target, lse, coef, A(eps), A(zl));
}

// Non-template, ISA-cloned entry points (target_clones needs concrete functions).
#define THR_DEFINE_ROWS(T, NAME)                                                          \
  THR_CLONES void forward_row_##NAME(const T* row, long V, long target, long ii,          \
                                     AccOf<T>::type* lse, AccOf<T>::type* loss, T* grad,  \
                                     const AccOf<T>::type* coef, double eps, double zl) { \
    forward_row<T>(row, V, target, ii, lse, loss, grad, coef, eps, zl);                   \
  }                                                                                       \
  THR_CLONES void backward_row_##NAME(const T* row, long V, long target, long ii,         \
                                      AccOf<T>::type lse, AccOf<T>::type coef, T* grad,   \
                                      double eps, double zl) {                            \
    backward_row<T>(row, V, target, ii, lse, coef, grad, eps, zl);                        \
  }

THR_DEFINE_ROWS(float, f32)
THR_DEFINE_ROWS(double, f64)
THR_DEFINE_ROWS(bf16_t, bf16)
THR_DEFINE_ROWS(f16_t, f16)

template <typename T>
void forward_rows(void (*fn)(const T*, long, long, long, typename AccOf<T>::type*,
                             typename AccOf<T>::type*, T*, const typename AccOf<T>::type*,
                             double, double),
                  uintptr_t logits, long N, long V, long stride, uintptr_t target,
                  uintptr_t lse, uintptr_t loss, uintptr_t grad, long grad_stride,
                  uintptr_t coef, long ignore_index, double eps, double zl, int threads) {
  using A = typename AccOf<T>::type;
  const T* x = reinterpret_cast<const T*>(logits);
  const int64_t* tgt = reinterpret_cast<const int64_t*>(target);
  A* lse_p = reinterpret_cast<A*>(lse);
  A* loss_p = reinterpret_cast<A*>(loss);
  T* g = reinterpret_cast<T*>(grad);
  const A* c = reinterpret_cast<const A*>(coef);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long i = 0; i < N; ++i) {
    fn(x + i * stride, V, tgt[i], ignore_index, lse_p + i, loss_p + i,
       g ? g + i * grad_stride : nullptr, c ? c + i : nullptr, eps, zl);
  }
}

template <typename T>
void backward_rows(void (*fn)(const T*, long, long, long, typename AccOf<T>::type,
                              typename AccOf<T>::type, T*, double, double),
                   uintptr_t logits, long N, long V, long stride, uintptr_t target,
                   uintptr_t lse, uintptr_t coef, uintptr_t grad, long grad_stride,
                   long ignore_index, double eps, double zl, int threads) {
  using A = typename AccOf<T>::type;
  const T* x = reinterpret_cast<const T*>(logits);
  const int64_t* tgt = reinterpret_cast<const int64_t*>(target);
  const A* lse_p = reinterpret_cast<const A*>(lse);
  const A* c = reinterpret_cast<const A*>(coef);
  T* g = reinterpret_cast<T*>(grad);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long i = 0; i < N; ++i) {
    fn(x + i * stride, V, tgt[i], ignore_index, lse_p[i], c[i], g + i * grad_stride, eps, zl);
  }
}

void ce_forward(uintptr_t logits, long N, long V, long stride, int dtype, uintptr_t target,
                uintptr_t lse, uintptr_t loss, uintptr_t grad, long grad_stride, uintptr_t coef,
                long ignore_index, double eps, double zl, int threads) {
  if (grad != 0 && coef == 0) throw std::invalid_argument("ce_forward: grad needs coef");
  py::gil_scoped_release release;
  switch (dtype) {
    case thr::kFloat32: forward_rows<float>(forward_row_f32, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ignore_index, eps, zl, threads); break;
    case thr::kFloat64: forward_rows<double>(forward_row_f64, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ignore_index, eps, zl, threads); break;
    case thr::kBFloat16: forward_rows<bf16_t>(forward_row_bf16, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ignore_index, eps, zl, threads); break;
    case thr::kFloat16: forward_rows<f16_t>(forward_row_f16, logits, N, V, stride, target, lse, loss, grad, grad_stride, coef, ignore_index, eps, zl, threads); break;
    default: throw std::invalid_argument("ce_forward: unsupported dtype code");
  }
}

void ce_backward(uintptr_t logits, long N, long V, long stride, int dtype, uintptr_t target,
                 uintptr_t lse, uintptr_t coef, uintptr_t grad, long grad_stride,
                 long ignore_index, double eps, double zl, int threads) {
  py::gil_scoped_release release;
  switch (dtype) {
    case thr::kFloat32: backward_rows<float>(backward_row_f32, logits, N, V, stride, target, lse, coef, grad, grad_stride, ignore_index, eps, zl, threads); break;
    case thr::kFloat64: backward_rows<double>(backward_row_f64, logits, N, V, stride, target, lse, coef, grad, grad_stride, ignore_index, eps, zl, threads); break;
    case thr::kBFloat16: backward_rows<bf16_t>(backward_row_bf16, logits, N, V, stride, target, lse, coef, grad, grad_stride, ignore_index, eps, zl, threads); break;
    case thr::kFloat16: backward_rows<f16_t>(backward_row_f16, logits, N, V, stride, target, lse, coef, grad, grad_stride, ignore_index, eps, zl, threads); break;
    default: throw std::invalid_argument("ce_backward: unsupported dtype code");
  }
}

}  // namespace

void register_cross_entropy(py::module_& m) {
  m.def("ce_forward", &ce_forward,
        "Weighted-CE forward over rows: lse, per-token loss, and (grad != 0) the gradient "
        "scaled per row by coef. Pointers are raw addresses; the caller validates everything.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("loss"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("coef"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("num_threads"));
  m.def("ce_backward", &ce_backward,
        "Weighted-CE gradient rows from saved lse, scaled per row by coef.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("coef"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("num_threads"));
}
