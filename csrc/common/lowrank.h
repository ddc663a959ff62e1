// Per-element maths of the fused low-rank Adam step (python/thresher/ops/lowrank.py), shared
// by the CPU kernels (cpu/lowrank.cpp) and the CUDA kernels (cuda/lowrank.cu), so the
// CPU tests exercise the exact arithmetic the GPU runs.
//
// On one element r of the projected gradient R (r x q for side "left", p x r for "right"):
//   m <- b1 m + (1 - b1) r          v <- b2 v + (1 - b2) r^2
//   n  = (m / bc1) / (sqrt(v / bc2) + eps)            (bc_i = 1 - b_i^step)
// n is the normalised low-rank direction that the back-projection GEMM turns into the update;
// v / bc2 (= v_hat) is also returned so the kernels can sum it over the rank dimension for
// LoRDO's normaliser D = sqrt(mean_rank v_hat).
#pragma once

#include <cmath>

#include "common/math.h"

namespace thr {
namespace lowrank {

// Step constants, computed once per call on the host (double) and narrowed to the storage
// type's accumulator (float for float32/bf16/fp16, double for float64).
template <typename A>
struct AdamCoef {
  A b1, omb1;      // beta1, 1 - beta1
  A b2, omb2;      // beta2, 1 - beta2
  A inv_bc1;       // 1 / (1 - beta1^step)
  A inv_bc2;       // 1 / (1 - beta2^step)
  A eps;
};

template <typename A>
THR_HD AdamCoef<A> adam_coef(double b1, double b2, double bc1, double bc2, double eps) {
  return AdamCoef<A>{A(b1), A(1.0 - b1), A(b2), A(1.0 - b2), A(1.0 / bc1), A(1.0 / bc2), A(eps)};
}

// One element: updates m and v in place, returns n; *v_hat receives v / bc2.
template <typename A>
THR_HD A adam_elem(A r, A& m, A& v, const AdamCoef<A>& c, A* v_hat) {
  m = c.b1 * m + c.omb1 * r;
  v = c.b2 * v + c.omb2 * (r * r);
  const A vh = v * c.inv_bc2;
  *v_hat = vh;
  return (m * c.inv_bc1) / (std::sqrt(vh) + c.eps);
}

// LoRDO's per-line weight of the full-rank term: lr (1 - omega) / (mu (D + eps)) with
// D = sqrt(sum_rank v_hat / rank). Computed once per row/column of the full-size tensor.
template <typename A>
THR_HD A fullrank_weight(A vhat_sum, long rank, double coef, double eps) {
  return A(coef) / (std::sqrt(vhat_sum / A(rank)) + A(eps));
}

}  // namespace lowrank
}  // namespace thr
