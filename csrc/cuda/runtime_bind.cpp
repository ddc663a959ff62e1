// thresher._C_cuda: binding of the module's device check (cuda/runtime.h).
#include <pybind11/pybind11.h>

#include "cuda/runtime.h"

namespace py = pybind11;

void register_runtime(py::module_& m) {
  m.def("runtime_status", &runtime_status_cuda,
        "'' when this module's CUDA runtime can use a device, else the reason (no device, or "
        "a driver older than the CUDA toolkit the module was built with).");
}
