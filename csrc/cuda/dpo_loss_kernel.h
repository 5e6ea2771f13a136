// The CUDA DPO loss launcher: raw pointers in DpoLossArgs, the caller's stream. No ATen here, so the .cu file builds
// with nvcc alone (the CPU torch wheel ships no CUDA headers of its own).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "dpo_loss_math.h"

namespace dpo_kernels {

// Device bytes `launch_dpo_loss_forward` needs as its workspace for a batch of `batch` pairs (0: none; the
// caller then may pass nullptr).
size_t dpo_loss_forward_workspace_bytes(int64_t batch);

// Every pair's loss, rewards and dloss/dlogp, and the batch means (loss, accuracy, margin), reduced in a fixed
// order so the result is bitwise reproducible: one launch up to a few thousand pairs, two above (per-block partial
// sums in `workspace`, then their sum). Returns the first launch error.
template <typename T>
cudaError_t launch_dpo_loss_forward(const DpoLossArgs<T>& args, void* workspace, cudaStream_t stream);

// The backward in one launch: out_chosen = grad_loss[0] * grad_chosen, out_rejected = grad_loss[0] * grad_rejected.
// grad_loss is read on the device (no host sync).
template <typename T>
cudaError_t launch_dpo_loss_backward(const T* grad_loss, const T* grad_chosen, const T* grad_rejected,
                                     T* out_chosen, T* out_rejected, int64_t batch, cudaStream_t stream);

}  // namespace dpo_kernels
