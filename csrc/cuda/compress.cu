// CUDA kernels of the compression op family (python/thresher/ops/compress.py, backend "cuda"):
// the launchers of cuda/compress.h, bound by cuda/compress_bind.cpp; the CPU twin is
// cpu/compress.cpp (same raw-pointer interface, same payload bytes). The per-element maths
// (quantiser, abs keys, bit streams, payload layouts) is common/compress.h, which the CPU tests
// exercise; the Python layer makes the tensors' device current.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/compress.h"
#include "common/math.h"
#include "cuda/compress.h"
#include "cuda/runtime.h"

namespace {

using thr::cmp::QuantLayout;
using thr::cmp::TopKLayout;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxChunk = 8192;
constexpr int kMaxBlock = 4096;

__device__ __forceinline__ float load_x(const void* x, long i, int dtype) {
  switch (dtype) {
    case thr::kBFloat16: return thr::bf16_to_float(static_cast<const uint16_t*>(x)[i]);
    case thr::kFloat16: return thr::half_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// v[i] = e + x for the warp's segment; returns the warp-wide max |v| key.
__device__ __forceinline__ uint32_t load_segment(const void* x, int dtype, const float* e, long base,
                                                 int len, float* v, int lane) {
  uint32_t mx = 0;
  for (int i = lane; i < len; i += 32) {
    float s = load_x(x, base + i, dtype);
    if (e) s = thr::cmp::add_rn(e[base + i], s);
    v[i] = s;
    const uint32_t k = thr::cmp::abs_key(s);
    mx = k > mx ? k : mx;
  }
  return __reduce_max_sync(kFull, mx);
}

// topk_encode: ONE WARP PER CHUNK (chunk <= 8192), the chunk's e + x held in shared memory
// (4 B an element) so that DRAM sees exactly one read of x, one read of e and one write of e:
//   1. load: lanes stride the chunk (coalesced), v = e + x into shared memory, warp max of
//      the |v| keys (__reduce_max_sync) = the absmax that sets the chunk's scale;
//   2. select: bitwise radix select of the k-th largest key, MSB first: per bit, every lane
//      counts its candidates (prefix match, bit set) over shared memory and one
//      __reduce_add_sync gives the warp total -- no __syncthreads, no atomics; it stops early
//      once every candidate left is needed (the prefix then already decides the set);
//   3. emit: 32 elements at a time in index order; __ballot_sync + __popc give each chosen
//      element its slot (and ties -- keys equal to the threshold -- go to the lowest indices,
//      as in every backend); chosen lanes quantise, store code and index to shared memory;
//      every lane writes its e (v, or v - deq) back, coalesced;
//   4. pack: lanes build whole payload bytes from the shared codes / indices (stream_byte).
// Shared memory per warp: 4 chunk + 8 k bytes (16 KiB + 512 B at the defaults); 4 warps a
// block (66 KiB, opt-in above 48 KiB), so an H100 SM (228 KiB) holds 12 chunks in flight.
// Work per chunk of C: C/32 shared loads a lane per radix bit (<= 31 bits; Gaussian data
// usually stops after ~12-20), which at C = 4096 keeps the kernel near the HBM roofline of
// 12 bytes an element (64M fp32: 805 MB, ~0.24 ms at 3.35 TB/s).
__global__ void __launch_bounds__(128)
topk_encode_kernel(const void* __restrict__ x, int dtype, float* __restrict__ e, uint8_t* __restrict__ out,
                   TopKLayout L, int warps_per_block) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long c = static_cast<long>(blockIdx.x) * warps_per_block + warp;
  if (c >= L.n_chunks) return;  // whole warps leave: no block barrier below
  const bool last = c == L.n_chunks - 1;
  const int len = static_cast<int>(last ? L.last_len : L.chunk);
  const int kk = static_cast<int>(last ? L.k_last : L.k_full);
  const long base = c * L.chunk;
  float* v = smem + warp * (L.chunk + 2 * L.k_full);
  uint32_t* codes = reinterpret_cast<uint32_t*>(v + L.chunk);
  uint32_t* idx = codes + L.k_full;

  const uint32_t mx = load_segment(x, dtype, e, base, len, v, lane);
  __syncwarp();

  // 2. radix select: T (threshold key) and `need` (how many keys == T to take)
  uint32_t prefix = 0, hi = 0;
  int need = kk;
  if (kk < len) {
    for (int b = 30; b >= 0; --b) {
      const uint32_t bit = 1u << b;
      int cnt = 0, cand = 0;
      for (int i = lane; i < len; i += 32) {
        const uint32_t k = thr::cmp::abs_key(v[i]);
        const bool match = (k & hi) == prefix;
        cand += match;
        cnt += match && (k & bit);
      }
      cand = __reduce_add_sync(kFull, cand);
      if (cand == need) break;  // every candidate left is taken: the prefix decides
      cnt = __reduce_add_sync(kFull, cnt);
      if (cnt >= need) {
        prefix |= bit;
      } else {
        need -= cnt;
      }
      hi |= bit;
    }
  } else {
    need = len;  // everything: hi = 0 matches all keys, and all of them are taken
  }

  // 3. emit in index order
  const float scale = thr::cmp::absmax_scale(thr::bits_to_float(mx), L.bits);
  const float inv = thr::cmp::inv_scale(scale);
  int pos = 0, taken_eq = 0;
  const unsigned lt = lanemask_lt();
  for (int r = 0; r < len; r += 32) {
    const int i = r + lane;
    const bool in = i < len;
    const float val = in ? v[i] : 0.0f;
    const uint32_t k = thr::cmp::abs_key(val) & hi;
    const bool gt = in && k > prefix;
    const bool eq = in && k == prefix;
    const unsigned eqmask = __ballot_sync(kFull, eq);
    const bool sel = gt || (eq && taken_eq + __popc(eqmask & lt) < need);
    const unsigned selmask = __ballot_sync(kFull, sel);
    float out_e = val;
    if (sel) {
      const int slot = pos + __popc(selmask & lt);
      const uint32_t q = thr::cmp::quantize(val, 0.0f, inv, L.bits);
      codes[slot] = q;
      idx[slot] = static_cast<uint32_t>(i);
      out_e = thr::cmp::sub_rn(val, thr::cmp::dequantize(q, 0.0f, scale, L.bits));
    }
    if (e && in) e[base + i] = out_e;
    taken_eq += __popc(eqmask);
    pos += __popc(selmask);
  }
  __syncwarp();

  // 4. pack
  if (lane == 0) reinterpret_cast<float*>(out)[c] = scale;
  uint8_t* vo = out + L.values_off + c * L.vb_full;
  uint8_t* io = out + L.indices_off + c * L.ib_full;
  const long vb = thr::cmp::packed_bytes(kk, L.bits), ib = thr::cmp::packed_bytes(kk, L.ibits);
  for (long p = lane; p < vb; p += 32) vo[p] = thr::cmp::stream_byte(codes, kk, L.bits, p);
  for (long p = lane; p < ib; p += 32) io[p] = thr::cmp::stream_byte(idx, kk, L.ibits, p);
}

// Decoders: one warp per chunk (top-k: indices are distinct within a payload, so no atomics)
// and one thread per element (blockwise).
__global__ void __launch_bounds__(128)
topk_decode_kernel(const uint8_t* __restrict__ p, float* __restrict__ out, int32_t* __restrict__ count,
                   TopKLayout L) {
  const int lane = threadIdx.x & 31;
  const long c = static_cast<long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (c >= L.n_chunks) return;
  const bool last = c == L.n_chunks - 1;
  const long len = last ? L.last_len : L.chunk;
  const long kk = last ? L.k_last : L.k_full;
  const float scale = reinterpret_cast<const float*>(p)[c];
  const uint8_t* vi = p + L.values_off + c * L.vb_full;
  const uint8_t* ii = p + L.indices_off + c * L.ib_full;
  const long vb = thr::cmp::packed_bytes(kk, L.bits), ib = thr::cmp::packed_bytes(kk, L.ibits);
  for (long j = lane; j < kk; j += 32) {
    const uint32_t i = thr::cmp::stream_item(ii, ib, L.ibits, j);
    if (i >= static_cast<uint64_t>(len)) continue;  // corrupted: skipped, never out of bounds
    const uint32_t q = thr::cmp::stream_item(vi, vb, L.bits, j);
    const long d = c * L.chunk + i;
    out[d] = thr::cmp::add_rn(out[d], thr::cmp::dequantize(q, 0.0f, scale, L.bits));
    if (count) count[d] += 1;
  }
}

// Pairwise sum of src[0..np) (np a power of two >= 32) with ping-pong shared buffers a (np)
// and b (np / 2); result valid in every lane.
__device__ float warp_pairwise_sum(float* a, float* b, int np, int lane) {
  float* src = a;
  float* dst = b;
  for (int w = np / 2; w >= 1; w /= 2) {
    for (int i = lane; i < w; i += 32) dst[i] = thr::cmp::add_rn(src[2 * i], src[2 * i + 1]);
    __syncwarp();
    float* t = src;
    src = dst;
    dst = t;
  }
  return src[0];
}

// quant_encode: one warp per block (<= 4096), v in shared memory; absmax by a warp max;
// mean and sigma by the pairwise tree of common/compress.h in shared memory (ping-pong
// buffers, a __syncwarp per level); lanes then write whole code bytes and the updated e.
__global__ void __launch_bounds__(128)
quant_encode_kernel(const void* __restrict__ x, int dtype, float* __restrict__ e, uint8_t* __restrict__ out,
                    QuantLayout L, int np, int warps_per_block) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long b = static_cast<long>(blockIdx.x) * warps_per_block + warp;
  if (b >= L.n_blocks) return;
  const int len = static_cast<int>(b == L.n_blocks - 1 ? L.last_len : L.block);
  const long base = b * L.block;
  const bool meanstd = L.scaling == thr::cmp::kScaleMeanStd;
  float* v = smem + warp * (L.block + (meanstd ? np + np / 2 : 0));
  const uint32_t mx = load_segment(x, dtype, e, base, len, v, lane);
  __syncwarp();
  float offset = 0.0f, scale;
  if (meanstd) {
    float* ta = v + L.block;
    float* tb = ta + np;
    for (int i = lane; i < np; i += 32) ta[i] = i < len ? v[i] : 0.0f;
    __syncwarp();
    offset = thr::cmp::div_rn(warp_pairwise_sum(ta, tb, np, lane), static_cast<float>(len));
    __syncwarp();
    for (int i = lane; i < np; i += 32) {
      const float d = i < len ? thr::cmp::sub_rn(v[i], offset) : 0.0f;
      ta[i] = thr::cmp::mul_rn(d, d);
    }
    __syncwarp();
    const float var = thr::cmp::div_rn(warp_pairwise_sum(ta, tb, np, lane), static_cast<float>(len));
    scale = thr::cmp::mul_rn(thr::cmp::sqrt_rn(var), thr::cmp::meanstd_half_step(L.bits));
  } else {
    scale = thr::cmp::absmax_scale(thr::bits_to_float(mx), L.bits);
  }
  if (lane == 0) {
    if (meanstd) reinterpret_cast<float*>(out)[b] = offset;
    reinterpret_cast<float*>(out + L.scale_off)[b] = scale;
  }
  const float inv = thr::cmp::inv_scale(scale);
  if (e) {
    for (int i = lane; i < len; i += 32) {
      const uint32_t q = thr::cmp::quantize(v[i], offset, inv, L.bits);
      e[base + i] = thr::cmp::sub_rn(v[i], thr::cmp::dequantize(q, offset, scale, L.bits));
    }
  }
  const int per = 8 / L.bits;
  uint8_t* co = out + L.codes_off + b * L.vb_full;
  const long vb = thr::cmp::packed_bytes(len, L.bits);
  for (long p = lane; p < vb; p += 32) {
    uint32_t byte = 0;
    for (int s = 0; s < per; ++s) {
      const long i = p * per + s;
      if (i < len) byte |= thr::cmp::quantize(v[i], offset, inv, L.bits) << (s * L.bits);
    }
    co[p] = static_cast<uint8_t>(byte);
  }
}

__global__ void __launch_bounds__(256)
quant_decode_kernel(const uint8_t* __restrict__ p, float* __restrict__ out, QuantLayout L) {
  const long stride = static_cast<long>(gridDim.x) * blockDim.x;
  for (long t = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; t < L.n; t += stride) {
    const long b = t / L.block, i = t - b * L.block;
    const long len = b == L.n_blocks - 1 ? L.last_len : L.block;
    const float offset = L.scaling == thr::cmp::kScaleMeanStd ? reinterpret_cast<const float*>(p)[b] : 0.0f;
    const float scale = reinterpret_cast<const float*>(p + L.scale_off)[b];
    const uint32_t q = thr::cmp::stream_item(p + L.codes_off + b * L.vb_full,
                                             thr::cmp::packed_bytes(len, L.bits), L.bits, i);
    out[t] = thr::cmp::add_rn(out[t], thr::cmp::dequantize(q, offset, scale, L.bits));
  }
}

unsigned blocks_for(long units, int per_block) {
  const long g = (units + per_block - 1) / per_block;
  if (g > INT_MAX) throw std::invalid_argument("thresher compress (cuda): too many chunks/blocks");
  return static_cast<unsigned>(g);
}

// Warps per block for `bytes_per_warp` of shared memory: up to 4, within 96 KiB a block.
int warps_for(long bytes_per_warp) {
  int w = static_cast<int>((96 * 1024) / (bytes_per_warp > 0 ? bytes_per_warp : 1));
  return w < 1 ? 1 : (w > 4 ? 4 : w);
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(bytes));
}

}  // namespace

void topk_encode_cuda(uintptr_t x, int dtype, uintptr_t error, long n, long k, long chunk, int bits,
                      uintptr_t out, uintptr_t stream) {
  check_dtype("topk_encode_cuda", dtype);
  if (chunk < 1 || chunk > kMaxChunk || k < 1)
    throw std::invalid_argument("topk_encode_cuda: need 1 <= chunk <= 8192 and k >= 1");
  const TopKLayout L = thr::cmp::topk_layout(n, k, chunk, bits);
  if (L.n_chunks == 0) return;
  const long per_warp = 4 * (chunk + 2 * L.k_full);
  const int w = warps_for(per_warp);
  const size_t smem = static_cast<size_t>(w) * per_warp;
  set_smem(topk_encode_kernel, smem);
  topk_encode_kernel<<<blocks_for(L.n_chunks, w), 32 * w, smem, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const void*>(x), dtype, reinterpret_cast<float*>(error),
      reinterpret_cast<uint8_t*>(out), L, w);
  check_launch("topk_encode_cuda");
}

void topk_decode_cuda(uintptr_t payload, long n, long k, long chunk, int bits, uintptr_t out,
                      uintptr_t count, uintptr_t stream) {
  const TopKLayout L = thr::cmp::topk_layout(n, k, chunk, bits);
  if (L.n_chunks == 0) return;
  topk_decode_kernel<<<blocks_for(L.n_chunks, 4), 128, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint8_t*>(payload), reinterpret_cast<float*>(out),
      reinterpret_cast<int32_t*>(count), L);
  check_launch("topk_decode_cuda");
}

void quant_encode_cuda(uintptr_t x, int dtype, uintptr_t error, long n, long block, int bits,
                       int scaling, uintptr_t out, uintptr_t stream) {
  check_dtype("quant_encode_cuda", dtype);
  if (block < 1 || block > kMaxBlock)
    throw std::invalid_argument("quant_encode_cuda: need 1 <= block <= 4096");
  const QuantLayout L = thr::cmp::quant_layout(n, block, bits, scaling);
  if (L.n_blocks == 0) return;
  int np = 32;
  while (np < block) np <<= 1;
  const long per_warp = 4 * (block + (scaling == thr::cmp::kScaleMeanStd ? np + np / 2 : 0));
  const int w = warps_for(per_warp);
  const size_t smem = static_cast<size_t>(w) * per_warp;
  set_smem(quant_encode_kernel, smem);
  quant_encode_kernel<<<blocks_for(L.n_blocks, w), 32 * w, smem, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const void*>(x), dtype, reinterpret_cast<float*>(error),
      reinterpret_cast<uint8_t*>(out), L, np, w);
  check_launch("quant_encode_cuda");
}

void quant_decode_cuda(uintptr_t payload, long n, long block, int bits, int scaling, uintptr_t out,
                       uintptr_t stream) {
  const QuantLayout L = thr::cmp::quant_layout(n, block, bits, scaling);
  if (L.n_blocks == 0) return;
  const long blocks = (n + 255) / 256;
  quant_decode_kernel<<<static_cast<unsigned>(blocks < 65535L * 32 ? blocks : 65535L * 32), 256, 0,
                        reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint8_t*>(payload), reinterpret_cast<float*>(out), L);
  check_launch("quant_decode_cuda");
}
