// Host-side pieces of the DPO loss op shared by the CPU and CUDA bindings: argument checks, the batch-coupled
// preparation (sorts for aot, sums for sft) done with ATen ops before the launch, and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dpo_loss_math.h"

namespace dpo_kernels {

using DpoLossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor>;

// Everything the kernel reads or writes besides the caller's inputs; keeps the tensors alive during the launch.
struct DpoLossBuffers {
  at::Tensor policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths;
  at::Tensor aot_sorted_policy, aot_sorted_ref, aot_rank;
  at::Tensor aotu_sorted_chosen, aotu_sorted_rejected, aotu_rank_chosen, aotu_rank_rejected;
  at::Tensor sft_sums;
  bool sft_from_means = false;
  at::Tensor loss, losses, chosen_rewards, rejected_rewards, reward_accuracy, reward_margin, grad_chosen,
      grad_rejected;
};

DpoLossBuffers prepare_dpo_loss(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                const std::optional<at::Tensor>& ref_chosen,
                                const std::optional<at::Tensor>& ref_rejected,
                                const std::optional<at::Tensor>& chosen_lengths,
                                const std::optional<at::Tensor>& rejected_lengths, at::IntArrayRef loss_types,
                                at::ArrayRef<double> loss_weights, at::ArrayRef<double> label_smoothing,
                                bool average);

template <typename T>
DpoLossArgs<T> make_dpo_loss_args(DpoLossBuffers& b, at::IntArrayRef loss_types, at::ArrayRef<double> loss_weights,
                                  at::ArrayRef<double> label_smoothing, double beta, double gamma, double tau,
                                  double dpop_lambda);

DpoLossResult results(const DpoLossBuffers& b);

// The backward op's arguments, checked: a one-element upstream gradient on the coefficients' device, returned
// contiguous and in their dtype; the coefficients themselves are two contiguous [B] vectors of one dtype.
struct DpoLossBackwardArgs {
  at::Tensor grad_loss, grad_chosen, grad_rejected;
};

DpoLossBackwardArgs prepare_dpo_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                              const at::Tensor& grad_rejected);

}  // namespace dpo_kernels
