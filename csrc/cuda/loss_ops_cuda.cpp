// The torch-facing CUDA binding of the loss ops (one file per dispatch key), compiled only by the CUDA build: the
// ops of dpo_loss_op.h and group_loss_op.h on the inputs' device, the pairwise op's large-batch workspace on the
// current stream, then the launches.
#include <torch/library.h>

#include "cuda/cuda_device.h"
#include "cuda/dpo_loss_kernel.h"
#include "cuda/group_loss_kernel.h"
#include "dpo_loss_op.h"
#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

// The `Device` of both ops' host paths, dpo_loss_forward_on / dpo_loss_backward_on (dpo_loss_op.h) and
// group_loss_forward_on / group_loss_backward_on (group_loss_op.h): each op's kernels, told apart by their arguments.
struct Cuda : CudaDevice {
  // The pairwise op.
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

  // The group op.
  template <typename T>
  static void forward(const GroupLossArgs<T>& args) {
    check_launch(launch_group_loss_forward(args, current_stream()), "group_loss_forward");
  }

  template <typename T>
  static void backward(const GroupLossBackwardArgs& a, at::Tensor& out) {
    check_launch(launch_group_loss_backward(a.grad_loss.data_ptr<T>(), a.grad.data_ptr<T>(), out.data_ptr<T>(),
                                            a.grad.numel(), current_stream()),
                 "group_loss_backward");
  }
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_on<dpo_kernels::Cuda>);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_on<dpo_kernels::Cuda>);
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_on<dpo_kernels::Cuda>);
  m.impl("group_loss_backward", &dpo_kernels::group_loss_backward_on<dpo_kernels::Cuda>);
}
