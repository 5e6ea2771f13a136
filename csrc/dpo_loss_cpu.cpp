// CPU implementation: pairs in parallel, the mean reduced in fixed chunks so the result does not depend on the
// number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dpo_loss_op.h"

namespace dpo_kernels {
namespace {

constexpr int64_t kChunk = 2048;

template <typename T>
void dpo_loss_cpu_kernel(const DpoLossArgs<T>& a) {
  const int64_t num_chunks = (a.batch + kChunk - 1) / kChunk;
  std::vector<double> loss_sums(num_chunks), margin_sums(num_chunks);
  std::vector<int64_t> correct_counts(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      double loss_sum = 0.0, margin_sum = 0.0;
      int64_t correct_count = 0;
      const int64_t end = std::min(a.batch, (chunk + 1) * kChunk);
      for (int64_t p = chunk * kChunk; p < end; ++p) {
        bool correct;
        T margin;
        loss_sum += static_cast<double>(dpo_pair(a, p, correct, margin));
        margin_sum += static_cast<double>(margin);
        correct_count += correct ? 1 : 0;
      }
      loss_sums[chunk] = loss_sum, margin_sums[chunk] = margin_sum, correct_counts[chunk] = correct_count;
    }
  });
  double loss_sum = 0.0, margin_sum = 0.0;
  int64_t correct_count = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    loss_sum += loss_sums[chunk], margin_sum += margin_sums[chunk], correct_count += correct_counts[chunk];
  }
  const double b = static_cast<double>(a.batch);
  *a.loss = static_cast<T>(loss_sum / b);
  *a.reward_margin = static_cast<T>(margin_sum / b);
  *a.reward_accuracy = static_cast<T>(static_cast<double>(correct_count) / b);
}

DpoLossResult dpo_loss_forward_cpu(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                   const std::optional<at::Tensor>& ref_chosen,
                                   const std::optional<at::Tensor>& ref_rejected,
                                   const std::optional<at::Tensor>& chosen_lengths,
                                   const std::optional<at::Tensor>& rejected_lengths, at::IntArrayRef loss_types,
                                   at::ArrayRef<double> loss_weights, at::ArrayRef<double> label_smoothing,
                                   double beta, double gamma, double tau, double dpop_lambda, bool average) {
  TORCH_CHECK(policy_chosen.device().is_cpu(), "dpo_loss_forward (CPU) got a tensor on ", policy_chosen.device());
  DpoLossBuffers b = prepare_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                                      rejected_lengths, loss_types, loss_weights, label_smoothing,
                                      average);
  if (b.policy_chosen.scalar_type() == at::kDouble) {
    dpo_loss_cpu_kernel(make_dpo_loss_args<double>(b, loss_types, loss_weights, label_smoothing, beta, gamma, tau,
                                                   dpop_lambda));
  } else {
    dpo_loss_cpu_kernel(make_dpo_loss_args<float>(b, loss_types, loss_weights, label_smoothing, beta, gamma, tau,
                                                  dpop_lambda));
  }
  return results(b);
}

template <typename T>
void dpo_loss_backward_cpu_kernel(const DpoLossBackwardArgs& a, at::Tensor& out_chosen, at::Tensor& out_rejected) {
  const T g = *a.grad_loss.data_ptr<T>();
  const T* gc = a.grad_chosen.data_ptr<T>();
  const T* gr = a.grad_rejected.data_ptr<T>();
  T* oc = out_chosen.data_ptr<T>();
  T* orj = out_rejected.data_ptr<T>();
  at::parallel_for(0, a.grad_chosen.numel(), 32 * kChunk, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      oc[p] = g * gc[p];
      orj[p] = g * gr[p];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dpo_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                                         const at::Tensor& grad_rejected) {
  TORCH_CHECK(grad_chosen.device().is_cpu(), "dpo_loss_backward (CPU) got a tensor on ", grad_chosen.device());
  const DpoLossBackwardArgs a = prepare_dpo_loss_backward(grad_loss, grad_chosen, grad_rejected);
  at::Tensor out_chosen = at::empty(a.grad_chosen.sizes(), a.grad_chosen.options());
  at::Tensor out_rejected = at::empty(a.grad_rejected.sizes(), a.grad_rejected.options());
  if (a.grad_chosen.scalar_type() == at::kDouble) {
    dpo_loss_backward_cpu_kernel<double>(a, out_chosen, out_rejected);
  } else {
    dpo_loss_backward_cpu_kernel<float>(a, out_chosen, out_rejected);
  }
  return {out_chosen, out_rejected};
}

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_cpu);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_cpu);
}
