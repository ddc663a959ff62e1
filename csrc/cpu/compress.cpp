// CPU kernels of the compression op family (python/thresher/ops/compress.py, backend "cpu"):
// the entry points of cpu/compress.h, bound by cpu/compress_bind.cpp. Raw pointers, sizes and
// dtype codes come from the Python layer, which validated them. The per-element maths
// (quantiser, keys, bit streams, payload layouts) is common/compress.h, shared with the CUDA
// kernels (cuda/compress.cu).
//
// Floating-point contraction is off for this file: a fused multiply-add in `e - m * scale`
// would differ in the last bit from the other backends (common/compress.h).
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/compress.h"
#include "common/math.h"
#include "cpu/clones.h"
#include "cpu/compress.h"

namespace {

using thr::cmp::QuantLayout;
using thr::cmp::TopKLayout;

inline float load_elem(const void* base, long i, int dtype) {
  switch (dtype) {
    case thr::kFloat32: return static_cast<const float*>(base)[i];
    case thr::kBFloat16: return thr::bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case thr::kFloat16: return thr::half_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<float>(static_cast<const double*>(base)[i]);
  }
}

// v[0..len) = e + x (e written back when given), returns the largest |v| key.
uint32_t load_chunk(const void* x, int dtype, float* e, long off, long len, float* v,
                    uint32_t* keys) {
  uint32_t mx = 0;
  if (dtype == thr::kFloat32) {
    const float* xs = static_cast<const float*>(x) + off;
    if (e) {
      float* es = e + off;
      for (long i = 0; i < len; ++i) {
        float s = es[i] + xs[i];
        es[i] = s;
        v[i] = s;
      }
    } else {
      std::memcpy(v, xs, sizeof(float) * len);
    }
  } else {
    for (long i = 0; i < len; ++i) v[i] = load_elem(x, off + i, dtype);
    if (e) {
      float* es = e + off;
      for (long i = 0; i < len; ++i) {
        float s = es[i] + v[i];
        es[i] = s;
        v[i] = s;
      }
    }
  }
  for (long i = 0; i < len; ++i) {
    uint32_t kk = thr::cmp::abs_key(v[i]);
    keys[i] = kk;
    mx = kk > mx ? kk : mx;
  }
  return mx;
}

// The k-th largest of the pairs (key_i, ~i) -- unique, so "ties to the lowest index" needs no
// special case -- as a 64-bit composite (key << 32) | ~i.
//
// Prefilter: split the chunk into k groups of g = len / k consecutive keys; each group's max is
// >= tau = the smallest of those k maxima, so at least k keys are >= tau and the k-th largest
// is among them. The group maxima are a vectorised max (no histogram to clear), and on
// Gaussian data only ~5-10% of a chunk clears tau (64 of 4096: ~300 candidates). The
// candidates are gathered branch-free in index order, and nth_element over a copy of them
// finds the threshold. When g < 2 (k > len / 2) every key is a candidate.
THR_AI uint64_t composite(uint32_t key, long i) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

uint64_t kth_composite(const uint32_t* keys, long len, long k, uint64_t* cand, long& n_cand,
                       std::vector<uint64_t>& work) {
  uint32_t tau = 0;
  const long g = len / k;
  if (g >= 2) {
    tau = 0xffffffffu;
    for (long j = 0; j < k; ++j) {
      const uint32_t* kj = keys + j * g;
      uint32_t m = 0;
      for (long t = 0; t < g; ++t) m = kj[t] > m ? kj[t] : m;
      tau = m < tau ? m : tau;
    }
  }
  long c = 0;
  for (long i = 0; i < len; ++i) {
    cand[c] = composite(keys[i], i);
    c += keys[i] >= tau;
  }
  n_cand = c;
  work.assign(cand, cand + c);
  std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), std::greater<uint64_t>());
  return work[k - 1];
}

// Pairwise sum of a[0..np) (np a power of two), destroying a: adjacent pairs first.
float pairwise_sum(float* a, long np) {
  for (long w = np / 2; w >= 1; w /= 2)
    for (long i = 0; i < w; ++i) a[i] = thr::cmp::add_rn(a[2 * i], a[2 * i + 1]);
  return a[0];
}

long next_pow2(long v) {
  long p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace

// topk_encode, per chunk of C elements (OpenMP over chunks, one chunk at a time per thread in
// thread-local buffers of C floats + C keys: 32 KiB at C = 4096, i.e. L1/L2 resident):
//   pass 1 (streams x and e once from DRAM, writes e once): v = e + x, e = v, key = |v| bits,
//          and the chunk's largest key (the absmax of the selection: the largest is always
//          chosen);
//   select: the k-th largest (key, -index) pair (kth_composite: a group-max prefilter keeps
//          a few hundred candidates, nth_element over them);
//   emit:  every candidate >= that pair is chosen, in index order (so the payload lists
//          indices ascending and ties go to the lowest index, as in every backend); its code
//          is computed and e[i] -= deq (a cache-hot line: e was just written);
//   pack:  the k codes and k indices into their byte-aligned records.
// DRAM traffic is 4 (x fp32) + 8 (e read + write) bytes per element, the floor for an op
// that must add x into e; 64M elements move 768 MB.
void topk_encode_cpu(uintptr_t x, int dtype, uintptr_t error, long n, long k, long chunk,
                     int bits, uintptr_t out, int num_threads) {
  const TopKLayout L = thr::cmp::topk_layout(n, k, chunk, bits);
  if (L.n_chunks == 0) return;
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  float* e = reinterpret_cast<float*>(error);
  const void* xs = reinterpret_cast<const void*>(x);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> v(chunk);
    std::vector<uint32_t> keys(chunk), codes(L.k_full), idx(L.k_full);
    std::vector<uint64_t> cand(chunk), work;
#pragma omp for schedule(static)
    for (long c = 0; c < L.n_chunks; ++c) {
      const long off = c * chunk;
      const bool last = c == L.n_chunks - 1;
      const long len = last ? L.last_len : chunk;
      const long kk = last ? L.k_last : L.k_full;
      const uint32_t mx = load_chunk(xs, dtype, e, off, len, v.data(), keys.data());
      const float scale = thr::cmp::absmax_scale(thr::bits_to_float(mx), bits);
      const float inv = thr::cmp::inv_scale(scale);
      long pos = 0;
      auto take = [&](long i) {
        const uint32_t q = thr::cmp::quantize(v[i], 0.0f, inv, bits);
        codes[pos] = q;
        idx[pos] = static_cast<uint32_t>(i);
        ++pos;
        if (e) e[off + i] = thr::cmp::sub_rn(v[i], thr::cmp::dequantize(q, 0.0f, scale, bits));
      };
      if (kk >= len) {
        for (long i = 0; i < len; ++i) take(i);
      } else if (kk > 0) {
        long n_cand = 0;
        const uint64_t t = kth_composite(keys.data(), len, kk, cand.data(), n_cand, work);
        for (long j = 0; j < n_cand; ++j)  // the candidates are in index order
          if (cand[j] >= t) take(static_cast<long>(~static_cast<uint32_t>(cand[j])));
      }
      std::memcpy(o + 4 * c, &scale, 4);
      uint8_t* vo = o + L.values_off + c * L.vb_full;
      uint8_t* io = o + L.indices_off + c * L.ib_full;
      const long vb = thr::cmp::packed_bytes(kk, bits), ib = thr::cmp::packed_bytes(kk, L.ibits);
      for (long p = 0; p < vb; ++p) vo[p] = thr::cmp::stream_byte(codes.data(), kk, bits, p);
      for (long p = 0; p < ib; ++p) io[p] = thr::cmp::stream_byte(idx.data(), kk, L.ibits, p);
    }
  }
}

// out[c*chunk + idx] += deq (and count[...] += 1). Returns the number of indices outside
// their chunk (skipped, never written): only a corrupted payload has any.
long topk_decode_cpu(uintptr_t payload, long n, long k, long chunk, int bits, uintptr_t out,
                     uintptr_t count, int num_threads) {
  const TopKLayout L = thr::cmp::topk_layout(n, k, chunk, bits);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(payload);
  float* o = reinterpret_cast<float*>(out);
  int32_t* cnt = reinterpret_cast<int32_t*>(count);
  long bad = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad)
  for (long c = 0; c < L.n_chunks; ++c) {
    const bool last = c == L.n_chunks - 1;
    const long len = last ? L.last_len : chunk;
    const long kk = last ? L.k_last : L.k_full;
    float scale;
    std::memcpy(&scale, p + 4 * c, 4);
    const uint8_t* vi = p + L.values_off + c * L.vb_full;
    const uint8_t* ii = p + L.indices_off + c * L.ib_full;
    const long vb = thr::cmp::packed_bytes(kk, bits), ib = thr::cmp::packed_bytes(kk, L.ibits);
    for (long j = 0; j < kk; ++j) {
      const uint32_t i = thr::cmp::stream_item(ii, ib, L.ibits, j);
      if (i >= static_cast<uint64_t>(len)) {
        ++bad;
        continue;
      }
      const uint32_t q = thr::cmp::stream_item(vi, vb, bits, j);
      o[c * chunk + i] = thr::cmp::add_rn(o[c * chunk + i], thr::cmp::dequantize(q, 0.0f, scale, bits));
      if (cnt) cnt[c * chunk + i] += 1;
    }
  }
  return bad;
}

// Blockwise quantisation works the same way per block (absmax: a max; meanstd: the pairwise
// mean and sigma of common/compress.h), and both decoders scatter-add into a float32 output.
void quant_encode_cpu(uintptr_t x, int dtype, uintptr_t error, long n, long block, int bits,
                      int scaling, uintptr_t out, int num_threads) {
  const QuantLayout L = thr::cmp::quant_layout(n, block, bits, scaling);
  if (L.n_blocks == 0) return;
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  float* e = reinterpret_cast<float*>(error);
  const void* xs = reinterpret_cast<const void*>(x);
  const long np = next_pow2(block);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> v(block), tree(np);
    std::vector<uint32_t> keys(block), codes(block);
#pragma omp for schedule(static)
    for (long b = 0; b < L.n_blocks; ++b) {
      const long off = b * block;
      const long len = b == L.n_blocks - 1 ? L.last_len : block;
      const uint32_t mx = load_chunk(xs, dtype, e, off, len, v.data(), keys.data());
      float offset = 0.0f, scale;
      if (scaling == thr::cmp::kScaleMeanStd) {
        std::fill(tree.begin(), tree.end(), 0.0f);
        std::copy(v.begin(), v.begin() + len, tree.begin());
        offset = thr::cmp::div_rn(pairwise_sum(tree.data(), np), static_cast<float>(len));
        std::fill(tree.begin(), tree.end(), 0.0f);
        for (long i = 0; i < len; ++i) {
          const float d = thr::cmp::sub_rn(v[i], offset);
          tree[i] = thr::cmp::mul_rn(d, d);
        }
        const float var = thr::cmp::div_rn(pairwise_sum(tree.data(), np), static_cast<float>(len));
        scale = thr::cmp::mul_rn(thr::cmp::sqrt_rn(var), thr::cmp::meanstd_half_step(bits));
        std::memcpy(o + 4 * b, &offset, 4);
      } else {
        scale = thr::cmp::absmax_scale(thr::bits_to_float(mx), bits);
      }
      std::memcpy(o + L.scale_off + 4 * b, &scale, 4);
      const float inv = thr::cmp::inv_scale(scale);
      for (long i = 0; i < len; ++i) {
        const uint32_t q = thr::cmp::quantize(v[i], offset, inv, bits);
        codes[i] = q;
        if (e) e[off + i] = thr::cmp::sub_rn(v[i], thr::cmp::dequantize(q, offset, scale, bits));
      }
      uint8_t* co = o + L.codes_off + b * L.vb_full;
      const long vb = thr::cmp::packed_bytes(len, bits);
      for (long p = 0; p < vb; ++p) co[p] = thr::cmp::stream_byte(codes.data(), len, bits, p);
    }
  }
}

void quant_decode_cpu(uintptr_t payload, long n, long block, int bits, int scaling,
                      uintptr_t out, int num_threads) {
  const QuantLayout L = thr::cmp::quant_layout(n, block, bits, scaling);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(payload);
  float* o = reinterpret_cast<float*>(out);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (long b = 0; b < L.n_blocks; ++b) {
    const long len = b == L.n_blocks - 1 ? L.last_len : block;
    float offset = 0.0f, scale;
    if (scaling == thr::cmp::kScaleMeanStd) std::memcpy(&offset, p + 4 * b, 4);
    std::memcpy(&scale, p + L.scale_off + 4 * b, 4);
    const uint8_t* ci = p + L.codes_off + b * L.vb_full;
    const long vb = thr::cmp::packed_bytes(len, bits);
    float* ob = o + b * block;
    for (long i = 0; i < len; ++i) {
      const uint32_t q = thr::cmp::stream_item(ci, vb, bits, i);
      ob[i] = thr::cmp::add_rn(ob[i], thr::cmp::dequantize(q, offset, scale, bits));
    }
  }
}
