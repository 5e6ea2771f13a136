// The torch-facing CUDA binding of the group DPO loss, compiled only by the CUDA build: the ops of group_loss_op.h
// on the inputs' device, then the launches on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/group_loss_kernel.h"
#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

// The `Device` of group_loss_forward_on and group_loss_backward_on (group_loss_op.h).
struct Cuda {
  static constexpr const char* kName = "CUDA";
  static bool holds(const at::Tensor& t) { return t.is_cuda(); }
  using Guard = c10::cuda::CUDAGuard;

  template <typename T>
  static void forward(const GroupLossArgs<T>& args) {
    const cudaError_t err = launch_group_loss_forward(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "group_loss_forward: kernel launch failed: ", cudaGetErrorString(err));
  }

  template <typename T>
  static void backward(const GroupLossBackwardArgs& a, at::Tensor& out) {
    const cudaError_t err =
        launch_group_loss_backward(a.grad_loss.data_ptr<T>(), a.grad.data_ptr<T>(), out.data_ptr<T>(),
                                   a.grad.numel(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "group_loss_backward: kernel launch failed: ", cudaGetErrorString(err));
  }
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_on<dpo_kernels::Cuda>);
  m.impl("group_loss_backward", &dpo_kernels::group_loss_backward_on<dpo_kernels::Cuda>);
}
