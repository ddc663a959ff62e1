// Scalar maths shared by the CPU kernels (cpu/) and the CUDA kernels (cuda/).
//
// Everything here is branch-free so that, on the CPU, GCC/Clang auto-vectorise the loops
// that call it (the ternaries become blends), and on the GPU each thread runs it as is.
// CPU tests therefore exercise the exact per-element maths the CUDA kernels use.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define THR_HD __host__ __device__ __forceinline__
#else
#define THR_HD inline __attribute__((always_inline))
#endif

namespace thr {

// dtype codes shared with python/thresher/ops/_native.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

THR_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__CUDACC__)
  float f;
  memcpy(&f, &u, 4);
  return f;
#else
  return __builtin_bit_cast(float, u);  // (memcpy here stops GCC vectorising callers)
#endif
}

THR_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__CUDACC__)
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// bfloat16 <-> float. bf16 is the top half of a float; rounding is to nearest-even, NaN kept
// quiet (the +0x7fff trick would otherwise carry a NaN's payload into the exponent).
THR_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

THR_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded);
}

// IEEE half <-> float without F16C: shift the exponent/mantissa into place and let a float
// multiply by 2^112 re-bias the exponent (it also turns half subnormals into the right
// float normals); Inf/NaN get their all-ones exponent back explicitly.
THR_HD float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t bits = float_to_bits(mag) | (em >= 0x7c00u ? 0x7f800000u : 0u);
  return bits_to_float(bits | sign);
}

THR_HD uint16_t float_to_half(float f) {
  // Round-to-nearest-even conversion (after the well-known branch-free construction:
  // subnormals by adding a magic float, normals by re-biasing and rounding the mantissa).
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t out;
  if (a >= 0x47800000u) {                    // |f| >= 65536 (overflow) or Inf/NaN
    out = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (a < 0x38800000u) {              // |f| < 2^-14: half subnormal or zero
    float mag = bits_to_float(a) + 0.5f;     // 0.5 = 2^-1: aligns mantissa to 2^-24 steps
    out = float_to_bits(mag) - 0x3f000000u;  // subtract the magic's bits
  } else {
    uint32_t mant_odd = (a >> 13) & 1u;
    a += 0xc8000fffu + mant_odd;             // re-bias exponent (-112<<23) and round
    out = a >> 13;
  }
  return static_cast<uint16_t>(out | sign);
}

// exp(x) in float, <= 2 ulp on [-87, 88]; exactly 0 below ln(FLT_MIN) = -87.34 (the float
// subnormals are flushed), so masked (-inf) logits get exactly zero probability and gradient,
// as on the other backends.
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, the Cephes degree-6 polynomial for
// exp(r), and 2^n written straight into the exponent bits.
// F is float or a GCC vector of floats and U the matching unsigned type: the CPU kernels
// call it on 8-wide vectors (AVX2 in the x86-64-v3 clone, 2x SSE otherwise), which is the
// same arithmetic as the scalar call. Branch-free on purpose.
#if !defined(__CUDACC__)
template <typename To, typename From>
inline __attribute__((always_inline)) To bitcast(From f) { return __builtin_bit_cast(To, f); }

template <typename F, typename U>
inline __attribute__((always_inline)) F exp_poly(F x) {
  const F lo = F{} - 87.0f, hi = F{} + 88.0f;
  const F x_in = x;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: adding it leaves n in the low mantissa bits
  // of `shifted` (read back as an integer below), with no floor() call or float->int convert.
  const F magic = F{} + 12582912.0f;
  F shifted = x * 1.44269504088896341f + magic;
  F n = shifted - magic;
  F r = x - n * 0.693359375f;  // ln2 split in two so n * C1 is exact
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  U e = bitcast<U>(shifted) - bitcast<U>(magic) + 127u;  // n + exponent bias
  const F r_exp = p * bitcast<F>(e << 23);
  return x_in < F{} - 87.33654475f ? F{} : r_exp;
}

// tanh(x) in float, a few ulp: the Cephes odd polynomial for |x| < 0.625 (where the exp form
// would cancel), else sign(x) (1 - 2 / (exp(2|x|) + 1)) on exp_poly (clamped: +-inf -> +-1).
// Same F/U convention as exp_poly; branch-free (both forms computed, one selected).
template <typename F, typename U>
inline __attribute__((always_inline)) F tanh_poly(F x) {
  const F zero = F{};
  const F a = x < zero ? -x : x;
  const F s = x * x;
  const F small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s +
                    1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
  const F e = exp_poly<F, U>(a + a);
  F big = 1.0f - 2.0f / (e + 1.0f);
  big = x < zero ? -big : big;
  return a < zero + 0.625f ? small : big;
}
#endif

THR_HD float fast_tanhf(float x) {
#if defined(__CUDACC__)
  return tanhf(x);
#else
  return tanh_poly<float, uint32_t>(x);
#endif
}

// Final-logit soft-capping (Gemma 2/3): x -> cap tanh(x / cap); cap == 0 means off. The
// gradient through it is multiplied by d cap tanh(x/cap) / dx = 1 - (capped / cap)^2.
THR_HD float softcap_value(float x, float cap, float inv_cap) {
  return cap == 0.0f ? x : cap * fast_tanhf(x * inv_cap);
}
THR_HD float softcap_slope(float capped, float inv_cap) {
  const float t = capped * inv_cap;
  return inv_cap == 0.0f ? 1.0f : 1.0f - t * t;  // (off: -inf * 0 would be NaN)
}

THR_HD float fast_expf(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#elif defined(__CUDACC__)
  return expf(x);  // host side of a .cu translation unit: never on a hot path
#else
  return exp_poly<float, uint32_t>(x);
#endif
}

// --- cross-entropy per-row algebra (docs/algorithms.md: weighted CE with smoothing, z-loss) ---
//
// With lse = logsumexp(x), label smoothing eps and z-loss coefficient zl, the per-token loss
//   l = (1-eps)(lse - x_y) + eps (lse - mean_j x_j) + zl lse^2
// and its gradient
//   dl/dx_j = p_j (1 + 2 zl lse) - eps/V - (1-eps) [j == y],   p_j = exp(x_j - lse).

THR_HD double ce_row_loss(double lse, double x_target, double sum_x, long vocab, double eps,
                          double zl) {
  return lse - (1.0 - eps) * x_target - eps * sum_x / static_cast<double>(vocab) + zl * lse * lse;
}

// Per-row constants of the gradient, and the per-element gradient itself (CPU and CUDA).
struct GradCoef {
  float lse;
  float scale_p;       // c (1 + 2 zl lse)
  float smooth;        // c eps / V
  float target_shift;  // c (1 - eps)
  float cap, inv_cap;  // soft-cap and 1/cap (both 0: off); used by capped_grad_value
};

THR_HD GradCoef grad_coef(float lse, float coef, double eps, double zl, long V, double cap = 0.0) {
  const float e = static_cast<float>(eps), z = static_cast<float>(zl);
  const float k = static_cast<float>(cap);
  return GradCoef{lse, coef * (1.0f + 2.0f * z * lse), coef * e / static_cast<float>(V),
                  coef * (1.0f - e), k, k == 0.0f ? 0.0f : 1.0f / k};
}

THR_HD float grad_value(float x, const GradCoef& c) {
  return fast_expf(x - c.lse) * c.scale_p - c.smooth;
}

THR_HD float grad_target_value(float x_t, const GradCoef& c) {
  return grad_value(x_t, c) - c.target_shift;
}

// grad_value of a raw (not yet capped) logit x, through the soft-cap (the CUDA kernels).
THR_HD float capped_grad_value(float x, const GradCoef& c) {
  const float xc = softcap_value(x, c.cap, c.inv_cap);
  return grad_value(xc, c) * softcap_slope(xc, c.inv_cap);
}
// The target's value, from its already capped logit.
THR_HD float capped_grad_target_value(float xc_t, const GradCoef& c) {
  return grad_target_value(xc_t, c) * softcap_slope(xc_t, c.inv_cap);
}

// Online log-sum-exp state: running max m and sum of exp(x - m).
struct LseState {
  float m;
  float s;
};

THR_HD LseState lse_merge(LseState a, LseState b) {
  float m = a.m > b.m ? a.m : b.m;
  // exp(-inf - -inf) would be NaN when a whole prefix is -inf: guard the empty side.
  float sa = a.s == 0.0f ? 0.0f : a.s * fast_expf(a.m - m);
  float sb = b.s == 0.0f ? 0.0f : b.s * fast_expf(b.m - m);
  return LseState{m, sa + sb};
}

}  // namespace thr
