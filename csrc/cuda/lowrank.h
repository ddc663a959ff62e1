// Launchers of the low-rank Adam CUDA kernels (cuda/lowrank.cu), bound as
// thresher._C_cuda.lowrank_* by cuda/lowrank_bind.cpp. Host-side declarations with no CUDA
// header: the arguments of cpu/lowrank.h, with the stream (an integer) in place of
// num_threads. float32/bfloat16/float16 storage. Asynchronous.
#pragma once

#include <cstdint>

// m, v updated in place, the normalised direction written over r, and (dsum != 0) the float32
// sum of v_hat over rows per column.
void lowrank_moments_cuda(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols,
                          long row_stride, long col_stride, int dtype, double beta1, double beta2,
                          double bias_correction1, double bias_correction2, double eps,
                          uintptr_t dsum, uintptr_t stream);

// p[i, j] -= g[i, j] * w[j] (axis 0) or w[i] (axis 1); w float32.
void lowrank_fullrank_update_cuda(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols,
                                  long p_row_stride, long g_row_stride, int dtype, int axis,
                                  uintptr_t stream);
