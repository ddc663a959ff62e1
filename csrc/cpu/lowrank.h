// Entry points of the low-rank Adam CPU kernels (cpu/lowrank.cpp), bound as
// thresher._C.lowrank_* by cpu/lowrank_bind.cpp. The GEMMs (projection R = Q^T G or G Q,
// back-projection) stay in PyTorch/BLAS; these two kernels are the elementwise work around
// them. float32 and float64 (bf16/fp16 parameters on the CPU go to the reference backend).
#pragma once

#include <cstdint>

// One pass over the small projected gradient R (rank x n after the Python layer's
// orientation): m and v updated in place, the normalised direction
// n = m_hat / (sqrt(v_hat) + eps) written over R (R is a per-step workspace), and, for LoRDO
// (dsum != 0), the per-line sum over the rank dimension of v_hat (-> the normaliser D).
// Per element: 3 reads (r, m, v) + 3 writes (n, m, v); eager PyTorch needs ~12 passes.
void lowrank_moments_cpu(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols,
                         long row_stride, long col_stride, int dtype, double beta1, double beta2,
                         double bias_correction1, double bias_correction2, double eps,
                         uintptr_t dsum, int num_threads);

// LoRDO's full-rank quasi-hyperbolic term in one pass over the full-size tensor,
// P[i, j] -= G[i, j] * w[j or i] (w = lr (1 - omega) / (mu (D + eps)) per column (axis 0) or
// row (axis 1)). GaLore's own update needs no pass here: the back-projection GEMM writes it
// straight into the parameter (addmm with beta = 1 - lr wd, alpha = -lr scale: BLAS reads and
// writes P once).
void lowrank_fullrank_update_cpu(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols,
                                 long p_row_stride, long g_row_stride, int dtype, int axis,
                                 int num_threads);
