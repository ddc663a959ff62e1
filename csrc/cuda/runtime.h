// What every launcher of thresher._C_cuda shares (cuda/runtime.cu): the device check the
// module exports as runtime_status (bound by cuda/runtime_bind.cpp), and the launch and dtype
// checks. Host-side declarations with no CUDA header.
#pragma once

#include <string>

// "" when this module's CUDA runtime can use a device, else why not (e.g. a driver older than
// the toolkit the module was built with: cudaErrorInsufficientDriver). For the Python layer's
// backend check, so that an unusable module is reported instead of failing at the first call.
std::string runtime_status_cuda();

// Throws std::runtime_error naming `what` when the last kernel launch failed.
void check_launch(const char* what);

// Throw std::invalid_argument naming `what` for a dtype code other than float32, bfloat16,
// float16 (the dtypes of the CUDA kernels): always (bad_dtype), or only then (check_dtype).
[[noreturn]] void bad_dtype(const char* what, int dtype);
void check_dtype(const char* what, int dtype);
