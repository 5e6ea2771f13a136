// Host-side pieces of the group DPO loss op shared by the CPU and CUDA bindings: argument checks, output allocation,
// and the ops on one device, as dpo_loss_op.h does for the pairwise op.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "group_loss_math.h"
#include "loss_op_host.h"

namespace dpo_kernels {

// (loss, losses, rewards, ranking_accuracy, top1_accuracy, groups_left_out, grad), as the schema names them.
using GroupLossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Everything the kernel reads or writes; keeps the tensors alive during the launch.
struct GroupLossBuffers {
  at::Tensor offsets, policy, ref, scores, lengths, best;
  at::Tensor loss, losses, rewards, ranking_accuracy, top1_accuracy, groups_left_out, grad;
};

// The arguments of one group_loss_forward call, named as its schema (group_loss_op.cpp) names them.
struct GroupLossInputs {
  const at::Tensor& policy;
  const std::optional<at::Tensor>& ref;
  const at::Tensor& offsets;
  const std::optional<at::Tensor>& scores;
  const std::optional<at::Tensor>& lengths;
  int64_t group_loss;
  int64_t pair_loss;
  int64_t top_k;
  bool score_gap;
  at::ArrayRef<double> params;  // [kNumGroupTerms * kNumHyperParams]: the ranking term's row, then the sft row
  bool average;
};

GroupLossBuffers prepare_group_loss(const GroupLossInputs& in);

template <typename T>
GroupLossArgs<T> make_group_loss_args(GroupLossBuffers& b, const GroupLossInputs& in);

GroupLossResult group_results(const GroupLossBuffers& b);

// The backward op's arguments, checked: a one-element upstream gradient in the coefficients' dtype, and the
// coefficients, a contiguous [R] float32 or float64 vector on its device.
struct GroupLossBackwardArgs {
  at::Tensor grad_loss, grad;
};

GroupLossBackwardArgs prepare_group_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad);

// The two ops on one device (loss_op_host.h); `Device` (loss_ops_cpu.cpp, cuda/loss_ops_cuda.cpp) gives,
// besides kName, holds and Guard, forward<T>(args) (every group, then the batch sums, then every group's scaling) and
// backward<T>(args, out).
template <typename Device>
GroupLossResult group_loss_forward_on(const at::Tensor& policy, const std::optional<at::Tensor>& ref,
                                      const at::Tensor& offsets, const std::optional<at::Tensor>& scores,
                                      const std::optional<at::Tensor>& lengths, int64_t group_loss, int64_t pair_loss,
                                      int64_t top_k, bool score_gap, at::ArrayRef<double> params, bool average) {
  return run_on_device<Device>(policy, "group_loss_forward", [&] {
    const GroupLossInputs in{policy, ref, offsets, scores, lengths, group_loss, pair_loss, top_k, score_gap, params,
                             average};
    GroupLossBuffers b = prepare_group_loss(in);
    dispatch_float_or_double(b.policy.scalar_type(),
                             [&](auto zero) { Device::forward(make_group_loss_args<decltype(zero)>(b, in)); });
    return group_results(b);
  });
}

template <typename Device>
at::Tensor group_loss_backward_on(const at::Tensor& grad_loss, const at::Tensor& grad) {
  return run_on_device<Device>(grad, "group_loss_backward", [&] {
    const GroupLossBackwardArgs a = prepare_group_loss_backward(grad_loss, grad);
    at::Tensor out = at::empty(a.grad.sizes(), a.grad.options());
    dispatch_float_or_double(a.grad.scalar_type(),
                             [&](auto zero) { Device::template backward<decltype(zero)>(a, out); });
    return out;
  });
}

}  // namespace dpo_kernels
