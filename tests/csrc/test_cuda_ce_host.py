"""The CUDA cross-entropy kernels' per-thread code, run on the CPU.

csrc/cuda/cross_entropy.cu is a thin shell (block reduction + launch) around the
__host__ __device__ sweeps of csrc/cuda/cross_entropy_device.cuh (and the maths of
csrc/common/ it includes). This test compiles that header with the host C++ compiler into a
small library that plays one CUDA block per row: every "thread" runs the same row_partial /
row_grad / row_zero calls as on the GPU, with the launcher's thread count, and the partials
are merged in the kernel's butterfly order (warp shuffles, then warp 0 over the warps'
results). The output is compared with the op's reference. This checks, without a GPU, the
row split (unaligned head, 16-byte vectors, tail), the thread -> element mapping (every
element written once: the gradient buffer starts as NaN), strided rows, grad aliasing
logits, grad aligned differently from logits, ignored rows, zero coefficients, label
smoothing and z-loss, for fp32, bf16 and fp16; and that no 16-byte access is misaligned (it
would fault on the GPU, not on the host).
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from thresher.ops.cross_entropy import reference_cross_entropy_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3}

HARNESS = r"""
#define THR_CE_HOST_CHECKS 1
#include <cstdint>
#include <vector>
#include "cuda/cross_entropy_device.cuh"

static long g_misaligned = 0;
extern "C" void thr_ce_misaligned(const void*) { ++g_misaligned; }

using namespace thr;
using namespace thr::ce;

namespace {

// The kernel's block reduction: butterfly inside each warp of 32, then warp 0 over the
// warps' lane-0 results (lanes past the warp count hold empty partials).
Partial block_reduce(std::vector<Partial> p) {
  const int n = static_cast<int>(p.size());
  auto butterfly = [](std::vector<Partial>& v, int base) {
    for (int off = 16; off > 0; off >>= 1) {
      std::vector<Partial> w(v.begin() + base, v.begin() + base + 32);
      for (int l = 0; l < 32; ++l) v[base + l] = merge(w[l], w[l ^ off]);
    }
  };
  for (int b = 0; b < n; b += 32) butterfly(p, b);
  std::vector<Partial> q(32, Partial{LseState{neg_inf(), 0.0f}, 0.0});
  for (int w = 0; w < n / 32; ++w) q[w] = p[32 * w];
  butterfly(q, 0);
  return q[0];
}

template <int D>
void fwd(const void* logits, long N, long V, long stride, const int64_t* target, float* lse,
         float* loss, void* grad, long gstride, const float* coef, long ii, double eps,
         double zl, double cap, int nthreads) {
  using E = Elem<D>;
  using S = typename E::S;
  if (nthreads <= 0) nthreads = threads_for(V, E::kVec);
  for (long row = 0; row < N; ++row) {
    const S* x = static_cast<const S*>(logits) + row * stride;
    S* g = grad ? static_cast<S*>(grad) + row * gstride : nullptr;
    const int64_t t = target[row];
    if (t == ii) {
      lse[row] = 0.0f;
      loss[row] = 0.0f;
      if (g) for (int tid = 0; tid < nthreads; ++tid) row_zero<D>(g, (int)V, tid, nthreads);
      continue;
    }
    const bool t_ok = t >= 0 && t < V;
    const float inv = cap == 0.0 ? 0.0f : 1.0f / static_cast<float>(cap);
    const float x_t = t_ok ? softcap_value(E::to_float(x[t]), (float)cap, inv) : quiet_nan();
    std::vector<Partial> parts;
    for (int tid = 0; tid < nthreads; ++tid)
      parts.push_back(row_partial<D>(x, (int)V, tid, nthreads, eps != 0.0, (float)cap));
    const Partial p = block_reduce(parts);
    const float l = lse_value(p.lse);
    lse[row] = l;
    loss[row] = static_cast<float>(ce_row_loss(l, x_t, p.sum_x, V, eps, zl));
    if (g) {
      const GradCoef c = grad_coef(l, coef[row], eps, zl, V, cap);
      for (int tid = nthreads - 1; tid >= 0; --tid) row_grad<D>(x, g, (int)V, tid, nthreads, c);
      if (t_ok) g[t] = E::from_float(capped_grad_target_value(x_t, c));
    }
  }
}

template <int D>
void bwd(const void* logits, long N, long V, long stride, const int64_t* target,
         const float* lse, const float* coef, void* grad, long gstride, long ii, double eps,
         double zl, double cap, int nthreads) {
  using E = Elem<D>;
  using S = typename E::S;
  if (nthreads <= 0) nthreads = threads_for(V, E::kVec);
  for (long row = 0; row < N; ++row) {
    const S* x = static_cast<const S*>(logits) + row * stride;
    S* g = static_cast<S*>(grad) + row * gstride;
    const int64_t t = target[row];
    if (t == ii || coef[row] == 0.0f) {
      for (int tid = 0; tid < nthreads; ++tid) row_zero<D>(g, (int)V, tid, nthreads);
      continue;
    }
    const bool t_ok = t >= 0 && t < V;
    const GradCoef c = grad_coef(lse[row], coef[row], eps, zl, V, cap);
    const float x_t = t_ok ? softcap_value(E::to_float(x[t]), c.cap, c.inv_cap) : 0.0f;
    for (int tid = 0; tid < nthreads; ++tid) row_grad<D>(x, g, (int)V, tid, nthreads, c);
    if (t_ok) g[t] = E::from_float(capped_grad_target_value(x_t, c));
  }
}

}  // namespace

extern "C" {
long emu_take_misaligned() { long n = g_misaligned; g_misaligned = 0; return n; }
int emu_threads_for(long V, int dtype) {
  return threads_for(V, dtype == kFloat32 ? Elem<kFloat32>::kVec : Elem<kBFloat16>::kVec);
}
void emu_fwd(const void* logits, long N, long V, long stride, int dtype, const int64_t* target,
             float* lse, float* loss, void* grad, long gstride, const float* coef, long ii,
             double eps, double zl, double cap, int nthreads) {
  switch (dtype) {
    case kFloat32: fwd<kFloat32>(logits, N, V, stride, target, lse, loss, grad, gstride, coef, ii, eps, zl, cap, nthreads); break;
    case kBFloat16: fwd<kBFloat16>(logits, N, V, stride, target, lse, loss, grad, gstride, coef, ii, eps, zl, cap, nthreads); break;
    case kFloat16: fwd<kFloat16>(logits, N, V, stride, target, lse, loss, grad, gstride, coef, ii, eps, zl, cap, nthreads); break;
  }
}
void emu_bwd(const void* logits, long N, long V, long stride, int dtype, const int64_t* target,
             const float* lse, const float* coef, void* grad, long gstride, long ii, double eps,
             double zl, double cap, int nthreads) {
  switch (dtype) {
    case kFloat32: bwd<kFloat32>(logits, N, V, stride, target, lse, coef, grad, gstride, ii, eps, zl, cap, nthreads); break;
    case kBFloat16: bwd<kBFloat16>(logits, N, V, stride, target, lse, coef, grad, gstride, ii, eps, zl, cap, nthreads); break;
    case kFloat16: bwd<kFloat16>(logits, N, V, stride, target, lse, coef, grad, gstride, ii, eps, zl, cap, nthreads); break;
  }
}
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no host C++ compiler to build the emulation library")
    d = tmp_path_factory.mktemp("ce_emu")
    src, lib = d / "emu.cpp", d / "libemu.so"
    src.write_text(HARNESS)
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra",
           f"-I{CSRC}", str(src), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    so = ctypes.CDLL(str(lib))
    L, I, D, P = ctypes.c_long, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    so.emu_threads_for.argtypes, so.emu_threads_for.restype = [L, I], I
    so.emu_take_misaligned.argtypes, so.emu_take_misaligned.restype = [], L
    so.emu_fwd.argtypes = [P, L, L, L, I, P, P, P, P, L, P, L, D, D, D, I]
    so.emu_bwd.argtypes = [P, L, L, L, I, P, P, P, P, L, L, D, D, D, I]
    return so


@pytest.fixture(autouse=True)
def _no_misaligned_vector_access(request):
    yield
    if "emu" in request.fixturenames:
        n = request.getfixturevalue("emu").emu_take_misaligned()
        assert n == 0, f"{n} 16-byte loads/stores at addresses that are not 16-byte aligned"


def _p(t):
    return None if t is None else t.data_ptr()


# float64 ground truth vs the emulation: (rtol, atol) of the gradient. rtol covers the storage
# dtype's rounding; atol the float32 lse (half an ulp of lse ~ 20 is 1e-6, and the target's
# p - 1 cancels to that absolute error), times coef <= 1.25.
TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (1.6e-2, 2e-6), torch.float16: (2e-3, 2e-6)}


def _check(x, target, coef, ii, eps, zl, loss, lse, grad, cap=0.0):
    ref_loss, ref_lse, ref_grad = reference_cross_entropy_rows(
        x.double(), target, None if coef is None else coef.double(), ii, eps, zl, cap)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    if grad is not None:
        rtol, atol = TOL[x.dtype]
        assert not grad.isnan().any(), "gradient element never written"
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


def _case(n, v, dtype, seed, *, col_offset=0, pad=0, ignore_rows=(), scale=4.0):
    """(n, v) logits, possibly a column window of a wider buffer (strided, misaligned rows)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, v + col_offset + pad, generator=g) * scale).to(dtype)
    x = base[:, col_offset:col_offset + v]
    target = torch.randint(0, v, (n,), generator=g)
    for r in ignore_rows:
        target[r] = -100
    coef = torch.rand(n, generator=g) + 0.25
    return x, target, coef


def _fwd(emu, x, target, coef, grad, ii=-100, eps=0.0, zl=0.0, nthreads=0, cap=0.0):
    n, v = x.shape
    loss, lse = torch.empty(n), torch.empty(n)
    emu.emu_fwd(_p(x), n, v, x.stride(0), CODES[x.dtype], _p(target), _p(lse), _p(loss),
                _p(grad), grad.stride(0) if grad is not None else 0, _p(coef), ii, eps, zl,
                cap, nthreads)
    return loss, lse


SHAPES = [(1, 1), (3, 2), (4, 7), (2, 8), (5, 9), (3, 33), (2, 1000), (3, 4099), (2, 50257)]


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("col_offset", [0, 1, 3])
def test_forward_with_grad(emu, dtype, n, v, col_offset):
    x, target, coef = _case(n, v, dtype, seed=n * 1000 + v + col_offset, col_offset=col_offset,
                            pad=col_offset, ignore_rows=(1,) if n > 2 else ())
    grad = torch.full((n, v), math.nan).to(dtype)
    loss, lse = _fwd(emu, x, target, coef, grad)
    _check(x, target, coef, -100, 0.0, 0.0, loss, lse, grad)


@pytest.mark.parametrize("dtype", list(CODES))
def test_forward_no_grad_smoothing_zloss(emu, dtype):
    x, target, coef = _case(4, 50257, dtype, seed=7, col_offset=1, ignore_rows=(2,))
    loss, lse = _fwd(emu, x, target, None, None, eps=0.1, zl=1e-3)
    _check(x, target, None, -100, 0.1, 1e-3, loss, lse, None)


@pytest.mark.parametrize("dtype", list(CODES))
def test_vocab_128256_smoothing_zloss(emu, dtype):
    assert emu.emu_threads_for(128256, CODES[dtype]) == 1024
    x, target, coef = _case(2, 128256, dtype, seed=11, scale=3.0)
    grad = torch.full((2, 128256), math.nan).to(dtype)
    loss, lse = _fwd(emu, x, target, coef, grad, eps=0.05, zl=1e-4)
    _check(x, target, coef, -100, 0.05, 1e-4, loss, lse, grad)


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("v,col_offset", [(50257, 0), (4099, 1), (1000, 2)])
def test_in_place_grad_aliases_logits(emu, dtype, v, col_offset):
    x, target, coef = _case(3, v, dtype, seed=v + col_offset, col_offset=col_offset)
    ref_x = x.clone()
    loss, lse = _fwd(emu, x, target, coef, x)  # grad written over the logits
    _check(ref_x, target, coef, -100, 0.0, 0.0, loss, lse, x)


@pytest.mark.parametrize("dtype", list(CODES))
def test_grad_aligned_unlike_logits(emu, dtype):
    # logits start one element past a 16-byte boundary, grad on one: scalar-store path
    x, target, coef = _case(3, 4099, dtype, seed=5, col_offset=1)
    grad = torch.full((3, 4099), math.nan).to(dtype)
    loss, lse = _fwd(emu, x, target, coef, grad, eps=0.2, zl=0.01)
    _check(x, target, coef, -100, 0.2, 0.01, loss, lse, grad)


@pytest.mark.parametrize("nthreads", [32, 128, 1024])
def test_any_block_size(emu, nthreads):
    x, target, coef = _case(3, 3001, torch.bfloat16, seed=nthreads, col_offset=3, pad=1)
    grad = torch.full((3, 3001), math.nan).to(torch.bfloat16)
    loss, lse = _fwd(emu, x, target, coef, grad, nthreads=nthreads)
    _check(x, target, coef, -100, 0.0, 0.0, loss, lse, grad)


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("in_place", [False, True])
def test_backward(emu, dtype, in_place):
    n, v = 5, 4099
    x, target, coef = _case(n, v, dtype, seed=3, col_offset=1, pad=2, ignore_rows=(0,))
    coef[3] = 0.0
    eps, zl = 0.1, 1e-3
    ref_x = x.clone()
    _, ref_lse, _ = reference_cross_entropy_rows(x.double(), target, None, -100, eps, zl)
    lse = ref_lse.float()
    grad = x if in_place else torch.full((n, v), math.nan).to(dtype)
    emu.emu_bwd(_p(x), n, v, x.stride(0), CODES[dtype], _p(target), _p(lse), _p(coef), _p(grad),
                grad.stride(0), -100, eps, zl, 0.0, 0)
    _, _, ref_grad = reference_cross_entropy_rows(ref_x.double(), target, coef.double(), -100,
                                                  eps, zl, lse=ref_lse)
    rtol, atol = TOL[dtype]
    assert not grad.isnan().any()
    assert (grad[0] == 0).all() and (grad[3] == 0).all()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


def test_extreme_rows(emu):
    # -inf entries, a row of -inf but the target, huge logits
    x = torch.tensor([[0.0, -math.inf, 2.0, -math.inf, 1.0],
                      [-math.inf, -math.inf, 5.0, -math.inf, -math.inf],
                      [100.0, -100.0, 0.0, 300.0, 300.0]])
    target = torch.tensor([2, 2, 3])
    coef = torch.ones(3)
    grad = torch.full_like(x, math.nan)
    loss, lse = _fwd(emu, x, target, coef, grad)
    ref_loss, ref_lse, ref_grad = reference_cross_entropy_rows(x.double(), target, coef.double(),
                                                               -100, 0.0, 0.0)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)  # lse 300.69 in fp32
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("cap", [1.0, 5.0, 30.0])
def test_softcap_forward_and_backward(emu, dtype, cap):
    # logits of scale 4 reach the tanh's curve at cap 5 and its saturation at cap 1
    n, v = 4, 4099
    x, target, coef = _case(n, v, dtype, seed=11, col_offset=1, ignore_rows=(2,))
    eps, zl = 0.1, 1e-3
    grad = torch.full((n, v), math.nan).to(dtype)
    loss, lse = _fwd(emu, x, target, coef, grad, eps=eps, zl=zl, cap=cap)
    _check(x, target, coef, -100, eps, zl, loss, lse, grad, cap)
    grad2 = torch.full((n, v), math.nan).to(dtype)
    emu.emu_bwd(_p(x), n, v, x.stride(0), CODES[dtype], _p(target), _p(lse), _p(coef), _p(grad2),
                grad2.stride(0), -100, eps, zl, cap, 0)
    _check(x, target, coef, -100, eps, zl, loss, lse, grad2, cap)
