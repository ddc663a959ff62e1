// thresher._C_cuda: bindings of the compression launchers (cuda/compress.h). Host C++: the
// argument names and order of thresher._C's functions (cpu/compress_bind.cpp), with `stream`
// (torch.cuda.current_stream().cuda_stream) in place of `num_threads`. The Python layer makes
// the tensors' device current. Each call releases the GIL; a C++ exception reaches Python as
// ValueError/RuntimeError.
#include <pybind11/pybind11.h>

#include "cuda/compress.h"

namespace py = pybind11;

void register_compress(py::module_& m) {
  m.def("topk_encode", &topk_encode_cuda, py::call_guard<py::gil_scoped_release>(),
        "Fused e += x; top-k of |e| per chunk (<= 8192; one warp a chunk); absmax quantisation; "
        "e -= dequantised; packing into `out` on `stream`. error == 0: no feedback. Asynchronous.",
        py::arg("x"), py::arg("dtype"), py::arg("error"), py::arg("n"), py::arg("k"),
        py::arg("chunk"), py::arg("bits"), py::arg("out"), py::arg("stream"));
  m.def("topk_decode", &topk_decode_cuda, py::call_guard<py::gil_scoped_release>(),
        "out[idx] += dequantised values (count += 1 when count != 0) on `stream`; out-of-chunk "
        "indices are skipped. Asynchronous.",
        py::arg("payload"), py::arg("n"), py::arg("k"), py::arg("chunk"), py::arg("bits"),
        py::arg("out"), py::arg("count"), py::arg("stream"));
  m.def("quant_encode", &quant_encode_cuda, py::call_guard<py::gil_scoped_release>(),
        "Blockwise absmax (0) / mean-sigma (1) quantisation (+ error feedback) on `stream`.",
        py::arg("x"), py::arg("dtype"), py::arg("error"), py::arg("n"), py::arg("block"),
        py::arg("bits"), py::arg("scaling"), py::arg("out"), py::arg("stream"));
  m.def("quant_decode", &quant_decode_cuda, py::call_guard<py::gil_scoped_release>(),
        "out += dequantised blockwise payload on `stream`.",
        py::arg("payload"), py::arg("n"), py::arg("block"), py::arg("bits"), py::arg("scaling"),
        py::arg("out"), py::arg("stream"));
}
