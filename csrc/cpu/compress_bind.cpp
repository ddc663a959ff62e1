// thresher._C: bindings of the compression CPU kernels (cpu/compress.h). Each call releases
// the GIL; a C++ exception reaches Python as ValueError/RuntimeError.
#include <pybind11/pybind11.h>

#include "cpu/compress.h"

namespace py = pybind11;

void register_compress(py::module_& m) {
  m.def("topk_encode", &topk_encode_cpu, py::call_guard<py::gil_scoped_release>(),
        "Fused e += x; top-k of |e| per chunk (ties to the lowest index); per-chunk absmax "
        "quantisation; e -= dequantised; packing into `out` (topk_layout bytes). error == 0: "
        "no error feedback (x is compressed as is).",
        py::arg("x"), py::arg("dtype"), py::arg("error"), py::arg("n"), py::arg("k"),
        py::arg("chunk"), py::arg("bits"), py::arg("out"), py::arg("num_threads"));
  m.def("topk_decode", &topk_decode_cpu, py::call_guard<py::gil_scoped_release>(),
        "out[idx] += dequantised values of a top-k payload (float32 out; count int32 or 0). "
        "Returns the number of out-of-chunk indices (skipped).",
        py::arg("payload"), py::arg("n"), py::arg("k"), py::arg("chunk"), py::arg("bits"),
        py::arg("out"), py::arg("count"), py::arg("num_threads"));
  m.def("quant_encode", &quant_encode_cpu, py::call_guard<py::gil_scoped_release>(),
        "Blockwise absmax (scaling 0) / mean-sigma (1) quantisation of x (+ error feedback "
        "when error != 0) into `out` (quant_layout bytes).",
        py::arg("x"), py::arg("dtype"), py::arg("error"), py::arg("n"), py::arg("block"),
        py::arg("bits"), py::arg("scaling"), py::arg("out"), py::arg("num_threads"));
  m.def("quant_decode", &quant_decode_cpu, py::call_guard<py::gil_scoped_release>(),
        "out += dequantised blockwise payload (float32 out).",
        py::arg("payload"), py::arg("n"), py::arg("block"), py::arg("bits"), py::arg("scaling"),
        py::arg("out"), py::arg("num_threads"));
}
