// The shared pieces of thresher._C_cuda's launchers declared in cuda/runtime.h. Host code
// only (no kernels); a .cu because it calls the CUDA runtime.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/math.h"
#include "cuda/runtime.h"

std::string runtime_status_cuda() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess && n > 0) return std::string();
  cudaGetLastError();
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  std::string why = err != cudaSuccess
      ? std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)
      : std::string("no CUDA device");
  return why + " (thresher._C_cuda has CUDA runtime " + ver(rt) + "; the driver supports " +
         (drv ? "CUDA " + ver(drv) : std::string("no CUDA: no driver found")) + ")";
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("thresher: ") + what + " launch failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

void bad_dtype(const char* what, int dtype) {
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype) +
                              " (CUDA supports float32, bfloat16, float16)");
}

void check_dtype(const char* what, int dtype) {
  if (dtype != thr::kFloat32 && dtype != thr::kBFloat16 && dtype != thr::kFloat16)
    bad_dtype(what, dtype);
}
