// The torch-facing CUDA binding, compiled only by the CUDA build: prepares the buffers with ATen on the current
// stream (aot's sorts, sft's sums, the large-batch workspace), then launches the kernels.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/dpo_loss_kernel.h"
#include "dpo_loss_op.h"

namespace dpo_kernels {
namespace {

DpoLossResult dpo_loss_forward_cuda(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                    const std::optional<at::Tensor>& ref_chosen,
                                    const std::optional<at::Tensor>& ref_rejected,
                                    const std::optional<at::Tensor>& chosen_lengths,
                                    const std::optional<at::Tensor>& rejected_lengths, at::IntArrayRef loss_types,
                                    at::ArrayRef<double> loss_weights, at::ArrayRef<double> label_smoothing,
                                    double beta, double gamma, double tau, double dpop_lambda, bool average) {
  TORCH_CHECK(policy_chosen.is_cuda(), "dpo_loss_forward (CUDA) got a tensor on ", policy_chosen.device());
  const c10::cuda::CUDAGuard guard(policy_chosen.device());
  DpoLossBuffers b = prepare_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                                      rejected_lengths, loss_types, loss_weights, label_smoothing,
                                      average);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const size_t workspace_bytes = dpo_loss_forward_workspace_bytes(b.policy_chosen.size(0));
  // Large batches only: per-block partial sums, from the caching allocator on the current stream.
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, b.policy_chosen.options().dtype(at::kByte));
  }
  void* workspace_ptr = workspace.defined() ? workspace.data_ptr() : nullptr;
  cudaError_t err;
  if (b.policy_chosen.scalar_type() == at::kDouble) {
    err = launch_dpo_loss_forward(make_dpo_loss_args<double>(b, loss_types, loss_weights, label_smoothing, beta,
                                                             gamma, tau, dpop_lambda),
                                  workspace_ptr, stream);
  } else {
    err = launch_dpo_loss_forward(make_dpo_loss_args<float>(b, loss_types, loss_weights, label_smoothing, beta,
                                                            gamma, tau, dpop_lambda),
                                  workspace_ptr, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "dpo_loss_forward: kernel launch failed: ", cudaGetErrorString(err));
  return results(b);
}

std::tuple<at::Tensor, at::Tensor> dpo_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                                          const at::Tensor& grad_rejected) {
  TORCH_CHECK(grad_chosen.is_cuda(), "dpo_loss_backward (CUDA) got a tensor on ", grad_chosen.device());
  const c10::cuda::CUDAGuard guard(grad_chosen.device());
  const DpoLossBackwardArgs a = prepare_dpo_loss_backward(grad_loss, grad_chosen, grad_rejected);
  at::Tensor out_chosen = at::empty(a.grad_chosen.sizes(), a.grad_chosen.options());
  at::Tensor out_rejected = at::empty(a.grad_rejected.sizes(), a.grad_rejected.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t batch = a.grad_chosen.numel();
  cudaError_t err;
  if (a.grad_chosen.scalar_type() == at::kDouble) {
    err = launch_dpo_loss_backward(a.grad_loss.data_ptr<double>(), a.grad_chosen.data_ptr<double>(),
                                   a.grad_rejected.data_ptr<double>(), out_chosen.data_ptr<double>(),
                                   out_rejected.data_ptr<double>(), batch, stream);
  } else {
    err = launch_dpo_loss_backward(a.grad_loss.data_ptr<float>(), a.grad_chosen.data_ptr<float>(),
                                   a.grad_rejected.data_ptr<float>(), out_chosen.data_ptr<float>(),
                                   out_rejected.data_ptr<float>(), batch, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "dpo_loss_backward: kernel launch failed: ", cudaGetErrorString(err));
  return {out_chosen, out_rejected};
}

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_cuda);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_cuda);
}
