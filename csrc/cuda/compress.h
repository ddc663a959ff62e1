// Launchers of the compression CUDA kernels (cuda/compress.cu), bound as thresher._C_cuda's
// topk_* / quant_* by cuda/compress_bind.cpp. Host-side declarations with no CUDA header: the
// arguments of cpu/compress.h, with the stream (an integer) in place of num_threads; the same
// payload bytes. x is float32/bfloat16/float16. Asynchronous.
#pragma once

#include <cstdint>

// Fused e += x; top-k of |e| per chunk (<= 8192, one warp a chunk); absmax quantisation;
// e -= dequantised; packing into `out`. error == 0: no feedback.
void topk_encode_cuda(uintptr_t x, int dtype, uintptr_t error, long n, long k, long chunk,
                      int bits, uintptr_t out, uintptr_t stream);

// out[idx] += dequantised values (count[idx] += 1 when count != 0); out-of-chunk indices are
// skipped.
void topk_decode_cuda(uintptr_t payload, long n, long k, long chunk, int bits, uintptr_t out,
                      uintptr_t count, uintptr_t stream);

// Blockwise (<= 4096) absmax (0) / mean-sigma (1) quantisation (+ error feedback).
void quant_encode_cuda(uintptr_t x, int dtype, uintptr_t error, long n, long block, int bits,
                       int scaling, uintptr_t out, uintptr_t stream);

// out += the dequantised blockwise payload.
void quant_decode_cuda(uintptr_t payload, long n, long block, int bits, int scaling,
                       uintptr_t out, uintptr_t stream);
