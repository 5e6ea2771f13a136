// The torch-facing CUDA binding, compiled only by the CUDA build: the ops of dpo_loss_op.h on the inputs' device,
// their ATen preparation (aot's sorts, sft's sums) and the large-batch workspace on the current stream, then the
// launches.
#include <torch/library.h>

#include "cuda/cuda_device.h"
#include "cuda/dpo_loss_kernel.h"
#include "dpo_loss_op.h"

namespace dpo_kernels {
namespace {

// The `Device` of dpo_loss_forward_on and dpo_loss_backward_on (dpo_loss_op.h).
struct Cuda : CudaDevice {
  template <typename T>
  static void forward(const DpoLossArgs<T>& args, const at::TensorOptions& options) {
    const size_t workspace_bytes = dpo_loss_forward_workspace_bytes(args.batch);
    // Large batches only: per-block partial sums, from the caching allocator on the current stream.
    at::Tensor workspace;
    if (workspace_bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, options.dtype(at::kByte));
    }
    void* workspace_ptr = workspace.defined() ? workspace.data_ptr() : nullptr;
    check_launch(launch_dpo_loss_forward(args, workspace_ptr, current_stream()), "dpo_loss_forward");
  }

  template <typename T>
  static void backward(const DpoLossBackwardArgs& a, at::Tensor& out_chosen, at::Tensor& out_rejected) {
    check_launch(launch_dpo_loss_backward(a.grad_loss.data_ptr<T>(), a.grad_chosen.data_ptr<T>(),
                                          a.grad_rejected.data_ptr<T>(), out_chosen.data_ptr<T>(),
                                          out_rejected.data_ptr<T>(), a.grad_chosen.numel(), current_stream()),
                 "dpo_loss_backward");
  }
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_on<dpo_kernels::Cuda>);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_on<dpo_kernels::Cuda>);
}
