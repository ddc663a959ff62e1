// Entry points of the cross-entropy CPU kernels (cpu/cross_entropy.cpp), bound as
// thresher._C.ce_forward / ce_backward by cpu/cross_entropy_bind.cpp. Raw addresses, sizes and
// a dtype code (thr::DType) from python/thresher/ops, which validated them.
#pragma once

#include <cstdint>

// lse, per-token loss and (grad != 0, which needs coef) the gradient scaled per row by coef;
// grad may equal logits. float32/float64/bfloat16/float16 logits; lse, loss and coef in the
// accumulation type (float64 for float64 logits, else float32); target int64.
void ce_forward_cpu(uintptr_t logits, long n_rows, long vocab, long row_stride, int dtype,
                    uintptr_t target, uintptr_t lse, uintptr_t loss, uintptr_t grad,
                    long grad_row_stride, uintptr_t coef, long ignore_index,
                    double label_smoothing, double z_loss, double softcap, int num_threads);

// The gradient rows from the saved lse, scaled per row by coef (grad may equal logits).
void ce_backward_cpu(uintptr_t logits, long n_rows, long vocab, long row_stride, int dtype,
                     uintptr_t target, uintptr_t lse, uintptr_t coef, uintptr_t grad,
                     long grad_row_stride, long ignore_index, double label_smoothing,
                     double z_loss, double softcap, int num_threads);
