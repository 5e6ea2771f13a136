// The torch-facing CUDA binding of the group DPO loss, compiled only by the CUDA build: the ops of group_loss_op.h
// on the inputs' device, then the launches on the current stream.
#include <torch/library.h>

#include "cuda/cuda_device.h"
#include "cuda/group_loss_kernel.h"
#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

// The `Device` of group_loss_forward_on and group_loss_backward_on (group_loss_op.h).
struct Cuda : CudaDevice {
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
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_on<dpo_kernels::Cuda>);
  m.impl("group_loss_backward", &dpo_kernels::group_loss_backward_on<dpo_kernels::Cuda>);
}
