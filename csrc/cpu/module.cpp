// thresher._C: the pybind11 module of the CPU kernels. Each op family binds its functions in
// cpu/<family>_bind.cpp; this file only builds the module.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_cross_entropy(py::module_& m);  // cpu/cross_entropy_bind.cpp
void register_lowrank(py::module_& m);        // cpu/lowrank_bind.cpp
void register_compress(py::module_& m);       // cpu/compress_bind.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "thresher CPU kernels (raw-pointer interface; validation lives in thresher.ops)";
#if defined(_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  register_cross_entropy(m);
  register_lowrank(m);
  register_compress(m);
}
