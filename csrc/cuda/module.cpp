// thresher._C_cuda: one pybind11 module for the CUDA kernels (csrc/cuda/*.cu).
// Compiled by the host C++ compiler, so no CUDA header here: the launchers take raw pointers
// and the stream (torch.cuda.current_stream().cuda_stream) as integers. Argument names and
// order are those of thresher._C (csrc/cpu), with `stream` in place of `num_threads`.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

// csrc/cuda/cross_entropy.cu
void ce_forward_cuda(uintptr_t logits, long N, long V, long row_stride, int dtype,
                     uintptr_t target, uintptr_t lse, uintptr_t loss, uintptr_t grad,
                     long grad_row_stride, uintptr_t coef, long ignore_index, double eps,
                     double zl, double softcap, uintptr_t stream);
void ce_backward_cuda(uintptr_t logits, long N, long V, long row_stride, int dtype,
                      uintptr_t target, uintptr_t lse, uintptr_t coef, uintptr_t grad,
                      long grad_row_stride, long ignore_index, double eps, double zl,
                      double softcap, uintptr_t stream);
std::string cuda_runtime_status();

// Later op families bind their launchers in csrc/cuda/<family>_bind.cpp (host C++).
void register_lowrank_cuda(py::module_& m);   // lowrank_bind.cpp
void register_compress_cuda(py::module_& m);  // compress_bind.cpp

namespace {

void ce_forward(uintptr_t logits, long n_rows, long vocab, long row_stride, int dtype,
                uintptr_t target, uintptr_t lse, uintptr_t loss, uintptr_t grad,
                long grad_row_stride, uintptr_t coef, long ignore_index, double label_smoothing,
                double z_loss, double softcap, uintptr_t stream) {
  py::gil_scoped_release release;  // re-acquired before an exception reaches Python
  ce_forward_cuda(logits, n_rows, vocab, row_stride, dtype, target, lse, loss, grad,
                  grad_row_stride, coef, ignore_index, label_smoothing, z_loss, softcap, stream);
}

void ce_backward(uintptr_t logits, long n_rows, long vocab, long row_stride, int dtype,
                 uintptr_t target, uintptr_t lse, uintptr_t coef, uintptr_t grad,
                 long grad_row_stride, long ignore_index, double label_smoothing, double z_loss,
                 double softcap, uintptr_t stream) {
  py::gil_scoped_release release;
  ce_backward_cuda(logits, n_rows, vocab, row_stride, dtype, target, lse, coef, grad,
                   grad_row_stride, ignore_index, label_smoothing, z_loss, softcap, stream);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "thresher CUDA kernels (raw-pointer interface; validation lives in thresher.ops)";
  m.def("runtime_status", &cuda_runtime_status,
        "'' when this module's CUDA runtime can use a device, else the reason (no device, or "
        "a driver older than the CUDA toolkit the module was built with).");
  m.def("ce_forward", &ce_forward,
        "Weighted-CE forward over rows on `stream`: lse, per-token loss, and (grad != 0) the "
        "gradient scaled per row by coef (grad may equal logits). float32/bfloat16/float16 "
        "logits; lse, loss and coef float32; target int64. Asynchronous.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("loss"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("coef"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("stream"));
  m.def("ce_backward", &ce_backward,
        "Weighted-CE gradient rows on `stream` from the saved lse, scaled per row by coef "
        "(grad may equal logits). Asynchronous.",
        py::arg("logits"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("dtype"), py::arg("target"), py::arg("lse"), py::arg("coef"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("softcap"), py::arg("stream"));
  register_lowrank_cuda(m);
  register_compress_cuda(m);
}
