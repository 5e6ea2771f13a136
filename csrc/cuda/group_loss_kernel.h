// The CUDA group DPO loss launchers: raw pointers in GroupLossArgs, the caller's stream. No ATen here, so the .cu
// file builds with nvcc alone.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "group_loss_math.h"

namespace dpo_kernels {

// Every group's loss, rewards and dloss/dlogp, and the batch's loss and metrics, in one launch of one block (the
// groups of a training batch number hundreds, and the scaling of every coefficient waits for the batch sums, which
// one block has after a barrier). Reduced in a fixed order: bitwise reproducible. Returns the launch error.
template <typename T>
cudaError_t launch_group_loss_forward(const GroupLossArgs<T>& args, cudaStream_t stream);

// The backward in one launch: out = grad_loss[0] * grad, grad_loss read on the device (no host sync).
template <typename T>
cudaError_t launch_group_loss_backward(const T* grad_loss, const T* grad, T* out, int64_t size, cudaStream_t stream);

}  // namespace dpo_kernels
