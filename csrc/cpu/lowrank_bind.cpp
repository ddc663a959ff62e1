// thresher._C: bindings of the low-rank Adam CPU kernels (cpu/lowrank.h). Each call releases
// the GIL; a C++ exception reaches Python as ValueError/RuntimeError.
#include <pybind11/pybind11.h>

#include "cpu/lowrank.h"

namespace py = pybind11;

void register_lowrank(py::module_& m) {
  m.def("lowrank_moments", &lowrank_moments_cpu, py::call_guard<py::gil_scoped_release>(),
        "Low-rank Adam moments in one pass: m, v updated in place, the normalised direction "
        "written over r, and (dsum != 0) the sum of v_hat over rows per column. r, m, v share "
        "the strided (rows = rank) x cols layout; dsum has the dtype of r.",
        py::arg("r"), py::arg("m"), py::arg("v"), py::arg("rows"), py::arg("cols"),
        py::arg("row_stride"), py::arg("col_stride"), py::arg("dtype"), py::arg("beta1"),
        py::arg("beta2"), py::arg("bias_correction1"), py::arg("bias_correction2"), py::arg("eps"),
        py::arg("dsum"), py::arg("num_threads"));
  m.def("lowrank_fullrank_update", &lowrank_fullrank_update_cpu,
        py::call_guard<py::gil_scoped_release>(),
        "p[i, j] -= g[i, j] * w[j] (axis 0) or w[i] (axis 1), in one pass; rows with a stride, "
        "contiguous columns.",
        py::arg("p"), py::arg("g"), py::arg("w"), py::arg("rows"), py::arg("cols"),
        py::arg("p_row_stride"), py::arg("g_row_stride"), py::arg("dtype"), py::arg("axis"),
        py::arg("num_threads"));
}
