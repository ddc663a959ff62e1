// thresher._C_cuda: bindings of the low-rank Adam launchers (csrc/cuda/lowrank.cu). Host
// C++ (no CUDA headers); same argument names and order as thresher._C's lowrank_* functions,
// with `stream` (torch.cuda.current_stream().cuda_stream) in place of `num_threads`.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

void lowrank_moments_cuda(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols,
                          long row_stride, long col_stride, int dtype, double beta1, double beta2,
                          double bc1, double bc2, double eps, uintptr_t dsum, uintptr_t stream);
void lowrank_fullrank_update_cuda(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols,
                                  long p_stride, long g_stride, int dtype, int axis,
                                  uintptr_t stream);

namespace {

void lowrank_moments(uintptr_t r, uintptr_t m, uintptr_t v, long rows, long cols, long row_stride,
                     long col_stride, int dtype, double beta1, double beta2, double bc1, double bc2,
                     double eps, uintptr_t dsum, uintptr_t stream) {
  py::gil_scoped_release release;
  lowrank_moments_cuda(r, m, v, rows, cols, row_stride, col_stride, dtype, beta1, beta2, bc1, bc2,
                       eps, dsum, stream);
}

void lowrank_fullrank_update(uintptr_t p, uintptr_t g, uintptr_t w, long rows, long cols,
                             long p_row_stride, long g_row_stride, int dtype, int axis,
                             uintptr_t stream) {
  py::gil_scoped_release release;
  lowrank_fullrank_update_cuda(p, g, w, rows, cols, p_row_stride, g_row_stride, dtype, axis, stream);
}

}  // namespace

void register_lowrank_cuda(py::module_& m) {
  m.def("lowrank_moments", &lowrank_moments,
        "Low-rank Adam moments on `stream`: m, v updated in place, the normalised direction "
        "written over r, and (dsum != 0) the float32 sum of v_hat over rows per column. "
        "Asynchronous.",
        py::arg("r"), py::arg("m"), py::arg("v"), py::arg("rows"), py::arg("cols"),
        py::arg("row_stride"), py::arg("col_stride"), py::arg("dtype"), py::arg("beta1"),
        py::arg("beta2"), py::arg("bias_correction1"), py::arg("bias_correction2"), py::arg("eps"),
        py::arg("dsum"), py::arg("stream"));
  m.def("lowrank_fullrank_update", &lowrank_fullrank_update,
        "p[i, j] -= g[i, j] * w[j] (axis 0) or w[i] (axis 1) on `stream`; w float32. "
        "Asynchronous.",
        py::arg("p"), py::arg("g"), py::arg("w"), py::arg("rows"), py::arg("cols"),
        py::arg("p_row_stride"), py::arg("g_row_stride"), py::arg("dtype"), py::arg("axis"),
        py::arg("stream"));
}
