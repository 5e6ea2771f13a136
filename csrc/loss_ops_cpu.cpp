// The CPU kernels of the loss ops (one file per dispatch key): pairs or groups in parallel, the batch sums reduced
// in fixed chunks (cpu_device.h), so the result does not depend on the number of threads.
#include <torch/library.h>

#include "cpu_device.h"
#include "dpo_loss_op.h"
#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

// The batch sums the means are taken of.
struct PairSums {
  double loss = 0.0, margin = 0.0;
  int64_t correct = 0;
};

// The `Device` of both ops' host paths, dpo_loss_forward_on / dpo_loss_backward_on (dpo_loss_op.h) and
// group_loss_forward_on / group_loss_backward_on (group_loss_op.h): each op's kernels, told apart by their arguments.
struct Cpu : CpuDevice {
  // The pairwise op.
  template <typename T>
  static void forward(const DpoLossArgs<T>& a, const at::TensorOptions& /*options*/) {
    const PairSums total = sum_in_fixed_chunks(
        a.batch, PairSums{},
        [&](PairSums& s, int64_t p) {
          bool correct;
          T margin;
          s.loss += static_cast<double>(dpo_pair(a, p, correct, margin));
          s.margin += static_cast<double>(margin);
          s.correct += correct ? 1 : 0;
        },
        [](PairSums& total, const PairSums& s) {
          total.loss += s.loss, total.margin += s.margin, total.correct += s.correct;
        });
    const double b = static_cast<double>(a.batch);
    *a.loss = static_cast<T>(total.loss / b);
    *a.reward_margin = static_cast<T>(total.margin / b);
    *a.reward_accuracy = static_cast<T>(static_cast<double>(total.correct) / b);
  }

  template <typename T>
  static void backward(const DpoLossBackwardArgs& a, at::Tensor& out_chosen, at::Tensor& out_rejected) {
    scale_by_upstream_grad<T>(a.grad_loss, a.grad_chosen, out_chosen);
    scale_by_upstream_grad<T>(a.grad_loss, a.grad_rejected, out_rejected);
  }

  // The group op.
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
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_on<dpo_kernels::Cpu>);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_on<dpo_kernels::Cpu>);
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_on<dpo_kernels::Cpu>);
  m.impl("group_loss_backward", &dpo_kernels::group_loss_backward_on<dpo_kernels::Cpu>);
}
