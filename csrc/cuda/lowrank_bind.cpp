// thresher._C_cuda: bindings of the low-rank Adam launchers (cuda/lowrank.h). Host C++: the
// argument names and order of thresher._C's lowrank_* functions, with `stream`
// (torch.cuda.current_stream().cuda_stream) in place of `num_threads`. Each call releases the
// GIL; a C++ exception reaches Python as ValueError/RuntimeError.
#include <pybind11/pybind11.h>

#include "cuda/lowrank.h"

namespace py = pybind11;

void register_lowrank(py::module_& m) {
  m.def("lowrank_moments", &lowrank_moments_cuda, py::call_guard<py::gil_scoped_release>(),
        "Low-rank Adam moments on `stream`: m, v updated in place, the normalised direction "
        "written over r, and (dsum != 0) the float32 sum of v_hat over rows per column. "
        "Asynchronous.",
        py::arg("r"), py::arg("m"), py::arg("v"), py::arg("rows"), py::arg("cols"),
        py::arg("row_stride"), py::arg("col_stride"), py::arg("dtype"), py::arg("beta1"),
        py::arg("beta2"), py::arg("bias_correction1"), py::arg("bias_correction2"), py::arg("eps"),
        py::arg("dsum"), py::arg("stream"));
  m.def("lowrank_fullrank_update", &lowrank_fullrank_update_cuda,
        py::call_guard<py::gil_scoped_release>(),
        "p[i, j] -= g[i, j] * w[j] (axis 0) or w[i] (axis 1) on `stream`; w float32. "
        "Asynchronous.",
        py::arg("p"), py::arg("g"), py::arg("w"), py::arg("rows"), py::arg("cols"),
        py::arg("p_row_stride"), py::arg("g_row_stride"), py::arg("dtype"), py::arg("axis"),
        py::arg("stream"));
}
