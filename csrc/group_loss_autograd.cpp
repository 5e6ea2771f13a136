// The group DPO loss op's autograd formula, registered in C++ at the Autograd key as the pairwise op's is
// (dpo_loss_autograd.cpp): the forward computed dloss/dlogp per response; the backward scales the saved
// coefficients by the upstream gradient of `loss` with one call of `group_loss_backward`. Only `loss` is
// differentiable; reference log-probs, scores and lengths get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_group_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dpo_kernels::group_loss_backward", "")
                             .typed<decltype(call_group_backward)>();
  return op.call(grad_loss, grad);
}

// What the forward computed that the graph node needs: the loss it becomes the grad_fn of, and the coefficients.
struct LossAndCoefficients {
  at::Tensor loss, grad;
};

// The node's one input is the policy log-probs and its one output `loss`; the op runs below autograd before the
// node is built, so the other outputs are plain tensors without grad.
class GroupLossFunction : public torch::autograd::Function<GroupLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& policy, const LossAndCoefficients& computed) {
    ctx->save_for_backward({computed.grad});
    return computed.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // One entry per forward argument: policy, and none for `computed`.
    variable_list grads(2);
    grads[0] = call_group_backward(grad_outputs[0], ctx->get_saved_variables()[0]);
    return grads;
  }
};

GroupLossResult group_loss_forward_autograd(const at::Tensor& policy, const std::optional<at::Tensor>& ref,
                                            const at::Tensor& offsets, const std::optional<at::Tensor>& scores,
                                            const std::optional<at::Tensor>& lengths, int64_t group_loss,
                                            int64_t pair_loss, int64_t top_k, bool score_gap,
                                            at::ArrayRef<double> params, bool average) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dpo_kernels::group_loss_forward", "")
                             .typed<decltype(group_loss_forward_autograd)>();
  GroupLossResult out;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op.call(policy, ref, offsets, scores, lengths, group_loss, pair_loss, top_k, score_gap, params, average);
  }
  if (torch::autograd::compute_requires_grad(policy)) {
    std::get<0>(out) = GroupLossFunction::apply(policy, LossAndCoefficients{std::get<0>(out), std::get<6>(out)});
  }
  return out;
}

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, Autograd, m) {
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_autograd);
}
