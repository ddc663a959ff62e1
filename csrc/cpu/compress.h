// Entry points of the compression CPU kernels (cpu/compress.cpp), bound as thresher._C's
// topk_* / quant_* by cpu/compress_bind.cpp. The payload layouts are common/compress.h's
// topk_layout / quant_layout; x is float32/float64/bfloat16/float16 (dtype code), error and
// out float32, count int32; error == 0 / count == 0: not used.
#pragma once

#include <cstdint>

// Fused e += x; top-k of |e| per chunk (ties to the lowest index); per-chunk absmax
// quantisation; e -= dequantised; packing into `out`.
void topk_encode_cpu(uintptr_t x, int dtype, uintptr_t error, long n, long k, long chunk,
                     int bits, uintptr_t out, int num_threads);

// out[idx] += dequantised values (count[idx] += 1); returns the number of out-of-chunk
// indices, which are skipped.
long topk_decode_cpu(uintptr_t payload, long n, long k, long chunk, int bits, uintptr_t out,
                     uintptr_t count, int num_threads);

// Blockwise absmax (scaling 0) / mean-sigma (1) quantisation of x (+ error feedback).
void quant_encode_cpu(uintptr_t x, int dtype, uintptr_t error, long n, long block, int bits,
                      int scaling, uintptr_t out, int num_threads);

// out += the dequantised blockwise payload.
void quant_decode_cpu(uintptr_t payload, long n, long block, int bits, int scaling,
                      uintptr_t out, int num_threads);
