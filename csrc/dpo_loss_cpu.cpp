// CPU implementation: pairs in parallel, the means reduced in fixed chunks (cpu_device.h) so the result does not
// depend on the number of threads.
#include <torch/library.h>

#include "cpu_device.h"
#include "dpo_loss_op.h"

namespace dpo_kernels {
namespace {

// The batch sums the means are taken of.
struct PairSums {
  double loss = 0.0, margin = 0.0;
  int64_t correct = 0;
};

// The `Device` of dpo_loss_forward_on and dpo_loss_backward_on (dpo_loss_op.h).
struct Cpu : CpuDevice {
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
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_on<dpo_kernels::Cpu>);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_on<dpo_kernels::Cpu>);
}
