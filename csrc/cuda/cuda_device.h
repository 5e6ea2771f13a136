// The CUDA side of the loss ops' CUDA binding (loss_ops_cuda.cpp): the `Device` basics
// of loss_op_host.h, the stream every launch goes on, and the launch check.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace dpo_kernels {

// kName, holds and Guard of a CUDA `Device`; each op's binding adds its kernels.
struct CudaDevice {
  static constexpr const char* kName = "CUDA";
  static bool holds(const at::Tensor& t) { return t.is_cuda(); }
  using Guard = c10::cuda::CUDAGuard;
};

// The current stream of the guarded device: the caching allocator's, so the launches order with the ATen work.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace dpo_kernels
