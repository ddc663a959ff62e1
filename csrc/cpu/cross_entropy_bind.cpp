// thresher._C: bindings of the cross-entropy CPU kernels (cpu/cross_entropy.h). Each call
// releases the GIL; a C++ exception reaches Python as ValueError/RuntimeError.
#include <pybind11/pybind11.h>

#include "cpu/cross_entropy.h"

namespace py = pybind11;

void register_cross_entropy(py::module_& m) {
  m.def("ce_forward", &ce_forward_cpu, py::call_guard<py::gil_scoped_release>(),
        "Weighted-CE forward over rows: lse, per-token loss, and (grad != 0) the gradient "
        "scaled per row by coef. Pointers are raw addresses; the caller validates everything.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("loss"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("coef"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("num_threads"));
  m.def("ce_backward", &ce_backward_cpu, py::call_guard<py::gil_scoped_release>(),
        "Weighted-CE gradient rows from saved lse, scaled per row by coef.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("coef"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("softcap"), py::arg("num_threads"));
}
