// thresher._C_cuda: bindings of the cross-entropy launchers (cuda/cross_entropy.h). Host C++:
// the argument names and order of thresher._C's, with `stream`
// (torch.cuda.current_stream().cuda_stream) in place of `num_threads`. Each call releases the
// GIL; a C++ exception reaches Python as ValueError/RuntimeError.
#include <pybind11/pybind11.h>

#include "cuda/cross_entropy.h"

namespace py = pybind11;

void register_cross_entropy(py::module_& m) {
  m.def("ce_forward", &ce_forward_cuda, py::call_guard<py::gil_scoped_release>(),
        "Weighted-CE forward over rows on `stream`: lse, per-token loss, and (grad != 0) the "
        "gradient scaled per row by coef (grad may equal logits). float32/bfloat16/float16 "
        "logits; lse, loss and coef float32; target int64. Asynchronous.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("loss"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("coef"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("stream"));
  m.def("ce_backward", &ce_backward_cuda, py::call_guard<py::gil_scoped_release>(),
        "Weighted-CE gradient rows on `stream` from the saved lse, scaled per row by coef "
        "(grad may equal logits). Asynchronous.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("coef"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("softcap"), py::arg("stream"));
}
