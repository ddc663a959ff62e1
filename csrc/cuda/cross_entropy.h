// Launchers of the cross-entropy CUDA kernels (cuda/cross_entropy.cu), bound as
// thresher._C_cuda.ce_forward / ce_backward by cuda/cross_entropy_bind.cpp. Host-side
// declarations with no CUDA header: raw addresses, sizes, a dtype code (thr::DType) and the
// stream come in as integers from python/thresher/ops, which validated them. Asynchronous.
#pragma once

#include <cstdint>

// lse, per-token loss and (grad != 0, which needs coef) the gradient scaled per row by coef;
// grad may equal logits. float32/bfloat16/float16 logits (float64 unsupported); lse, loss and
// coef float32; target int64.
void ce_forward_cuda(uintptr_t logits, long n_rows, long vocab, long row_stride, int dtype,
                     uintptr_t target, uintptr_t lse, uintptr_t loss, uintptr_t grad,
                     long grad_row_stride, uintptr_t coef, long ignore_index,
                     double label_smoothing, double z_loss, double softcap, uintptr_t stream);

// The gradient rows from the saved lse, scaled per row by coef (grad may equal logits).
void ce_backward_cuda(uintptr_t logits, long n_rows, long vocab, long row_stride, int dtype,
                      uintptr_t target, uintptr_t lse, uintptr_t coef, uintptr_t grad,
                      long grad_row_stride, long ignore_index, double label_smoothing,
                      double z_loss, double softcap, uintptr_t stream);
