// thresher._C_cuda: the pybind11 module of the CUDA kernels. Each op family binds its
// launchers in cuda/<family>_bind.cpp (host C++, so no CUDA header here), and
// cuda/runtime_bind.cpp the device check; this file only builds the module.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_runtime(py::module_& m);        // cuda/runtime_bind.cpp
void register_cross_entropy(py::module_& m);  // cuda/cross_entropy_bind.cpp
void register_lowrank(py::module_& m);        // cuda/lowrank_bind.cpp
void register_compress(py::module_& m);       // cuda/compress_bind.cpp

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "thresher CUDA kernels (raw-pointer interface; validation lives in thresher.ops)";
  register_runtime(m);
  register_cross_entropy(m);
  register_lowrank(m);
  register_compress(m);
}
