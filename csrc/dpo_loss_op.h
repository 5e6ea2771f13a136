// Host-side pieces of the DPO loss op shared by the CPU and CUDA bindings: argument checks, the batch-coupled
// preparation (sorts for aot, sums for sft) done with ATen ops before the launch, and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dpo_loss_math.h"
#include "loss_op_host.h"

namespace dpo_kernels {

using DpoLossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor>;

// Everything the kernel reads or writes besides the caller's inputs; keeps the tensors alive during the launch.
struct DpoLossBuffers {
  at::Tensor policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths;
  at::Tensor aot_sorted_policy, aot_sorted_ref, aot_rank;
  at::Tensor aotu_sorted_chosen, aotu_sorted_rejected, aotu_rank_chosen, aotu_rank_rejected;
  at::Tensor sft_sums;
  bool from_means = false;
  at::Tensor loss, losses, chosen_rewards, rejected_rewards, reward_accuracy, reward_margin, grad_chosen,
      grad_rejected;
};

// The arguments of one dpo_loss_forward call, named as its schema (TORCH_LIBRARY in dpo_loss_op.cpp) names them;
// they live as long as the call.
struct DpoLossInputs {
  const at::Tensor& policy_chosen;
  const at::Tensor& policy_rejected;
  const std::optional<at::Tensor>& ref_chosen;
  const std::optional<at::Tensor>& ref_rejected;
  const std::optional<at::Tensor>& chosen_lengths;
  const std::optional<at::Tensor>& rejected_lengths;
  at::IntArrayRef loss_types;
  at::ArrayRef<double> params;  // [len(loss_types) * kNumHyperParams]: each term's row in enum HyperParam order
  bool average;
};

DpoLossBuffers prepare_dpo_loss(const DpoLossInputs& in);

template <typename T>
DpoLossArgs<T> make_dpo_loss_args(DpoLossBuffers& b, const DpoLossInputs& in);

DpoLossResult results(const DpoLossBuffers& b);

// The backward op's arguments, checked: a one-element upstream gradient on the coefficients' device, returned
// contiguous and in their dtype; the coefficients themselves are two contiguous [B] vectors of one dtype.
struct DpoLossBackwardArgs {
  at::Tensor grad_loss, grad_chosen, grad_rejected;
};

DpoLossBackwardArgs prepare_dpo_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                              const at::Tensor& grad_rejected);

// The two ops on one device (loss_op_host.h): the host code above around the device's kernels, so that the CPU and
// CUDA bindings differ only in `Device`, which gives, besides kName, holds and Guard,
//   forward<T>(args, options)     the forward kernels over every pair (`options`: the inputs', for a workspace);
//   backward<T>(args, out_chosen, out_rejected)  the backward kernel.
template <typename Device>
DpoLossResult dpo_loss_forward_on(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                  const std::optional<at::Tensor>& ref_chosen,
                                  const std::optional<at::Tensor>& ref_rejected,
                                  const std::optional<at::Tensor>& chosen_lengths,
                                  const std::optional<at::Tensor>& rejected_lengths, at::IntArrayRef loss_types,
                                  at::ArrayRef<double> params, bool average) {
  return run_on_device<Device>(policy_chosen, "dpo_loss_forward", [&] {
    const DpoLossInputs in{policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                           rejected_lengths, loss_types, params, average};
    DpoLossBuffers b = prepare_dpo_loss(in);
    dispatch_float_or_double(b.policy_chosen.scalar_type(), [&](auto zero) {
      Device::forward(make_dpo_loss_args<decltype(zero)>(b, in), b.policy_chosen.options());
    });
    return results(b);
  });
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> dpo_loss_backward_on(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                                        const at::Tensor& grad_rejected) {
  return run_on_device<Device>(grad_chosen, "dpo_loss_backward", [&] {
    const DpoLossBackwardArgs a = prepare_dpo_loss_backward(grad_loss, grad_chosen, grad_rejected);
    at::Tensor out_chosen = at::empty(a.grad_chosen.sizes(), a.grad_chosen.options());
    at::Tensor out_rejected = at::empty(a.grad_rejected.sizes(), a.grad_rejected.options());
    dispatch_float_or_double(a.grad_chosen.scalar_type(), [&](auto zero) {
      Device::template backward<decltype(zero)>(a, out_chosen, out_rejected);
    });
    return std::tuple<at::Tensor, at::Tensor>(out_chosen, out_rejected);
  });
}

}  // namespace dpo_kernels
