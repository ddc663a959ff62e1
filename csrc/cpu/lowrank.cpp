// thresher._C: lowrank op family (placeholder registration; filled in by its issue).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_lowrank(py::module_& m) { (void)m; }
