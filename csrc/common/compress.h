// Per-element maths of the compression op family (python/thresher/ops/compress.py), shared by
// the CPU kernels (cpu/compress.cpp) and the CUDA kernels (cuda/compress.cu), so the CPU tests
// exercise exactly what the GPU runs. The Triton kernels (python/thresher/kernels/compress.py)
// and the PyTorch reference spell out the same operations in the same order.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace thr {
namespace cmp {

// Quantiser (mid-rise, L = 2^bits levels, codes q in [0, L)):
//   deq(q) = (2q + 1 - L) * scale + offset              levels at odd multiples of `scale`
//   q(v)   = clamp(floor((v - offset) * inv), -L/2, L/2 - 1) + L/2,   inv = 0.5 / scale
// so the decision boundaries sit at even multiples of `scale` (round to the nearest level).
//   absmax:  offset = 0, scale = absmax / (L - 1)       (the extreme levels are +-absmax)
//   meanstd: offset = mean, scale = sigma * c_b / 2     (c_b: step of the MSE-optimal uniform
//            quantiser of a Gaussian, Max 1960: 0.9957 (4 levels), 0.3352 (16), ~0.0308 (256))
// scale == 0 (a block of equal values) gives inv = 0, every code L/2 and deq = offset.
constexpr int kScaleAbsmax = 0;
constexpr int kScaleMeanStd = 1;

// c_b / 2 for bits 2, 4, 8 (see above); exact halvings of the decimal constants.
THR_HD float meanstd_half_step(int bits) {
  return bits == 2 ? 0.49785f : (bits == 4 ? 0.1676f : 0.0154f);
}

// Every backend must produce bit-identical codes and error updates, so each operation is one
// IEEE-rounded step (no fused multiply-add: the CUDA code uses the __f*_rn intrinsics, which
// are never contracted; cpu/compress.cpp turns contraction off; Triton launches with
// enable_fp_fusion=False), divisions and square roots are correctly rounded, and the mean /
// sigma of a block are pairwise sums over the block zero-padded to a power of two (adjacent
// pairs first: the tree a CUDA warp builds with shfl_down 1, 2, 4, ...).
// One known exception: the CUDA module is built with --use_fast_math, i.e. flush-to-zero, so
// subnormal values (|v| < 2^-126) and scales can differ from the CPU/reference bytes there.
THR_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
THR_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
THR_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
THR_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
THR_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// |v| as an order-preserving unsigned key: non-negative floats compare like their bits, and
// NaN (0x7fc00000...) ranks above +inf, so a NaN is always selected and poisons the scale,
// which the Python layer turns into a ValueError.
THR_HD uint32_t abs_key(float v) { return float_to_bits(v) & 0x7fffffffu; }

// Index width of the top-k payload: 12 bits for chunks <= 4096, 16 up to 65536, else 32.
THR_HD int index_bits(long chunk) { return chunk <= 4096 ? 12 : (chunk <= 65536 ? 16 : 32); }

// Bytes of `count` items of `width` bits, packed LSB-first (a record is byte aligned).
THR_HD long packed_bytes(long count, int width) { return (count * width + 7) / 8; }

THR_HD float absmax_scale(float absmax, int bits) {
  return div_rn(absmax, static_cast<float>((1 << bits) - 1));
}

THR_HD float inv_scale(float scale) { return scale == 0.0f ? 0.0f : div_rn(0.5f, scale); }

THR_HD uint32_t quantize(float v, float offset, float inv, int bits) {
  const float half_levels = static_cast<float>(1 << (bits - 1));
  float t = mul_rn(sub_rn(v, offset), inv);
  // Clamp first (floor and clamp commute here), so t fits an int; a NaN fails both compares
  // and becomes -L/2, i.e. code 0, deterministically.
  t = t > -half_levels ? t : -half_levels;
  t = t < half_levels - 1.0f ? t : half_levels - 1.0f;
  // floor by truncation and a correction: exact, and no libm call (baseline x86-64 has no
  // SSE4.1 roundss, so floorf would be a function call per element on the CPU).
  int f = static_cast<int>(t);
  f -= static_cast<float>(f) > t;
  return static_cast<uint32_t>(f + (1 << (bits - 1)));
}

THR_HD float dequantize(uint32_t q, float offset, float scale, int bits) {
  const int m = 2 * static_cast<int>(q) + 1 - (1 << bits);
  return add_rn(mul_rn(static_cast<float>(m), scale), offset);
}

// Byte p of an LSB-first bit stream of `count` items of `width` bits (width 2, 4, 8, 12, 16
// or 32) held in items[0..count). Item j occupies bits [j*width, (j+1)*width).
THR_HD uint8_t stream_byte(const uint32_t* items, long count, int width, long p) {
  if (width <= 8) {  // 8 / width items per byte, none straddles a byte
    const int per = 8 / width;
    uint32_t b = 0;
    for (int s = 0; s < per; ++s) {
      const long j = p * per + s;
      if (j < count) b |= items[j] << (s * width);
    }
    return static_cast<uint8_t>(b);
  }
  const long bit = p * 8;
  const long j = bit / width;
  const int off = static_cast<int>(bit - j * width);
  uint64_t v = static_cast<uint64_t>(items[j]) >> off;
  if (off + 8 > width && j + 1 < count) v |= static_cast<uint64_t>(items[j + 1]) << (width - off);
  return static_cast<uint8_t>(v & 0xffu);
}

// Item j (width bits) of an LSB-first bit stream of nbytes bytes.
THR_HD uint32_t stream_item(const uint8_t* bytes, long nbytes, int width, long j) {
  const long bit = j * width;
  const long b0 = bit >> 3;
  const int off = static_cast<int>(bit & 7);
  uint64_t v = 0;
  const int need = (off + width + 7) >> 3;  // bytes touched: at most 5 (32-bit, offset 4)
  for (int i = 0; i < need; ++i) {
    if (b0 + i < nbytes) v |= static_cast<uint64_t>(bytes[b0 + i]) << (8 * i);
  }
  v >>= off;
  return static_cast<uint32_t>(width == 32 ? v : (v & ((uint64_t{1} << width) - 1)));
}

// Layout of a top-k payload (all records byte aligned; the last chunk may be short):
//   float32 scale[n_chunks] | value codes, chunk c at c*VB(k) | indices, chunk c at c*IB(k)
struct TopKLayout {
  long n, chunk, n_chunks, k_full, k_last, last_len;
  int bits, ibits;
  long vb_full, ib_full, values_off, indices_off, total;
};

THR_HD long min_l(long a, long b) { return a < b ? a : b; }

THR_HD TopKLayout topk_layout(long n, long k, long chunk, int bits) {
  TopKLayout L;
  L.n = n;
  L.chunk = chunk;
  L.bits = bits;
  L.ibits = index_bits(chunk);
  L.n_chunks = (n + chunk - 1) / chunk;
  L.last_len = n - (L.n_chunks > 0 ? (L.n_chunks - 1) * chunk : 0);
  L.k_full = min_l(k, chunk);
  L.k_last = min_l(k, L.last_len);
  L.vb_full = packed_bytes(L.k_full, bits);
  L.ib_full = packed_bytes(L.k_full, L.ibits);
  L.values_off = 4 * L.n_chunks;
  const long nfull = L.n_chunks > 0 ? L.n_chunks - 1 : 0;
  L.indices_off = L.values_off + nfull * L.vb_full + (L.n_chunks > 0 ? packed_bytes(L.k_last, bits) : 0);
  L.total = L.indices_off + nfull * L.ib_full + (L.n_chunks > 0 ? packed_bytes(L.k_last, L.ibits) : 0);
  return L;
}

// Layout of a blockwise-quantised payload:
//   float32 offset[n_blocks] (meanstd only) | float32 scale[n_blocks] | codes, block b at b*VB(block)
struct QuantLayout {
  long n, block, n_blocks, last_len, vb_full, scale_off, codes_off, total;
  int bits, scaling;
};

THR_HD QuantLayout quant_layout(long n, long block, int bits, int scaling) {
  QuantLayout L;
  L.n = n;
  L.block = block;
  L.bits = bits;
  L.scaling = scaling;
  L.n_blocks = (n + block - 1) / block;
  L.last_len = n - (L.n_blocks > 0 ? (L.n_blocks - 1) * block : 0);
  L.vb_full = packed_bytes(block, bits);
  L.scale_off = scaling == kScaleMeanStd ? 4 * L.n_blocks : 0;
  L.codes_off = L.scale_off + 4 * L.n_blocks;
  L.total = L.codes_off + (L.n_blocks > 0 ? (L.n_blocks - 1) * L.vb_full + packed_bytes(L.last_len, bits) : 0);
  return L;
}

}  // namespace cmp
}  // namespace thr
