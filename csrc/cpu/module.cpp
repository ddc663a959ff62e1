// thresher._C: one pybind11 module; each op family adds its functions here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_cross_entropy(py::module_& m);  // cross_entropy.cpp
void register_lowrank(py::module_& m);        // lowrank.cpp
void register_compress(py::module_& m);       // compress.cpp

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
