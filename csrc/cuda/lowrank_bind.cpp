// thresher._C_cuda: lowrank launchers' bindings (placeholder registration; filled in by its issue).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_lowrank_cuda(py::module_& m) { (void)m; }
