// thresher._C_cuda: bindings of the compression launchers (csrc/cuda/compress.cu). Host C++
// (no CUDA headers); same argument names and order as thresher._C's functions
// (csrc/cpu/compress.cpp), with `stream` (torch.cuda.current_stream().cuda_stream) in place
// of `num_threads`. The Python layer makes the tensors' device current.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

void topk_encode_cuda(uintptr_t x, int dtype, uintptr_t error, long n, long k, long chunk, int bits,
                      uintptr_t out, uintptr_t stream);
void topk_decode_cuda(uintptr_t payload, long n, long k, long chunk, int bits, uintptr_t out,
                      uintptr_t count, uintptr_t stream);
void quant_encode_cuda(uintptr_t x, int dtype, uintptr_t error, long n, long block, int bits,
                       int scaling, uintptr_t out, uintptr_t stream);
void quant_decode_cuda(uintptr_t payload, long n, long block, int bits, int scaling, uintptr_t out,
                       uintptr_t stream);

namespace {

void topk_encode(uintptr_t x, int dtype, uintptr_t error, long n, long k, long chunk, int bits,
                 uintptr_t out, uintptr_t stream) {
  py::gil_scoped_release release;
  topk_encode_cuda(x, dtype, error, n, k, chunk, bits, out, stream);
}

void topk_decode(uintptr_t payload, long n, long k, long chunk, int bits, uintptr_t out,
                 uintptr_t count, uintptr_t stream) {
  py::gil_scoped_release release;
  topk_decode_cuda(payload, n, k, chunk, bits, out, count, stream);
}

void quant_encode(uintptr_t x, int dtype, uintptr_t error, long n, long block, int bits, int scaling,
                  uintptr_t out, uintptr_t stream) {
  py::gil_scoped_release release;
  quant_encode_cuda(x, dtype, error, n, block, bits, scaling, out, stream);
}

void quant_decode(uintptr_t payload, long n, long block, int bits, int scaling, uintptr_t out,
                  uintptr_t stream) {
  py::gil_scoped_release release;
  quant_decode_cuda(payload, n, block, bits, scaling, out, stream);
}

}  // namespace

void register_compress_cuda(py::module_& m) {
  m.def("topk_encode", &topk_encode,
        "Fused e += x; top-k of |e| per chunk (<= 8192; one warp a chunk); absmax quantisation; "
        "e -= dequantised; packing into `out` on `stream`. error == 0: no feedback. Asynchronous.",
        py::arg("x"), py::arg("dtype"), py::arg("error"), py::arg("n"), py::arg("k"),
        py::arg("chunk"), py::arg("bits"), py::arg("out"), py::arg("stream"));
  m.def("topk_decode", &topk_decode,
        "out[idx] += dequantised values (count += 1 when count != 0) on `stream`; out-of-chunk "
        "indices are skipped. Asynchronous.",
        py::arg("payload"), py::arg("n"), py::arg("k"), py::arg("chunk"), py::arg("bits"),
        py::arg("out"), py::arg("count"), py::arg("stream"));
  m.def("quant_encode", &quant_encode,
        "Blockwise absmax (0) / mean-sigma (1) quantisation (+ error feedback) on `stream`.",
        py::arg("x"), py::arg("dtype"), py::arg("error"), py::arg("n"), py::arg("block"),
        py::arg("bits"), py::arg("scaling"), py::arg("out"), py::arg("stream"));
  m.def("quant_decode", &quant_decode, "out += dequantised blockwise payload on `stream`.",
        py::arg("payload"), py::arg("n"), py::arg("block"), py::arg("bits"), py::arg("scaling"),
        py::arg("out"), py::arg("stream"));
}
