// CPU implementation of the group DPO loss: groups in parallel, the batch sums reduced in fixed chunks
// (cpu_device.h), so the result does not depend on the number of threads.
#include <torch/library.h>

#include "cpu_device.h"
#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

// The `Device` of group_loss_forward_on and group_loss_backward_on (group_loss_op.h).
struct Cpu : CpuDevice {
  template <typename T>
  static void forward(const GroupLossArgs<T>& a) {
    const GroupPartial total = sum_in_fixed_chunks(
        a.num_groups, group_partial_zero(), [&](GroupPartial& s, int64_t g) { add_partial(s, group_forward(a, g)); },
        [](GroupPartial& total, const GroupPartial& s) { add_partial(total, s); });
    const T sft = write_group_scalars(a, total);
    const T inv_kept = T(1) / T(total.kept > 0 ? total.kept : 1);
    const T total_len = static_cast<T>(total.sft_len < 1.0 ? 1.0 : total.sft_len);
    at::parallel_for(0, a.num_groups, kCpuChunk, [&](int64_t first, int64_t last) {
      for (int64_t g = first; g < last; ++g) group_finish(a, g, inv_kept, sft, total_len);
    });
  }

  template <typename T>
  static void backward(const GroupLossBackwardArgs& a, at::Tensor& out) {
    scale_by_upstream_grad<T>(a.grad_loss, a.grad, out);
  }
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_on<dpo_kernels::Cpu>);
  m.impl("group_loss_backward", &dpo_kernels::group_loss_backward_on<dpo_kernels::Cpu>);
}
