// The DPO loss op's autograd formula, registered in C++ at the Autograd key so that a training step's forward and
// backward never enter Python: at B = 8 the op is launch-bound, and torch.library's Python autograd machinery cost
// several times the kernel's own time. The forward already computed dloss/dlogp per sequence; the backward scales
// those saved coefficients by the upstream gradient of `loss` with one call of the `dpo_loss_backward` op.
//
// Only `loss` is differentiable: the other outputs carry no grad_fn, so using them in a graph that needs their
// gradient raises instead of silently giving zero. Reference log-probs and lengths get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "dpo_loss_op.h"

namespace dpo_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                                 const at::Tensor& grad_rejected) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dpo_kernels::dpo_loss_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_loss, grad_chosen, grad_rejected);
}

// What the forward computed that the graph node needs: the loss it becomes the grad_fn of, and the coefficients.
struct LossAndCoefficients {
  at::Tensor loss, grad_chosen, grad_rejected;
};

// The node's inputs are only the two policy log-probs and its only output is `loss`: the op itself runs below
// autograd before the node is built, so the other seven outputs never pass through autograd's output wrapping
// (they are plain tensors without grad) and the node stays as small as the step it records.
class DpoLossFunction : public torch::autograd::Function<DpoLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                            const LossAndCoefficients& computed) {
    ctx->save_for_backward({computed.grad_chosen, computed.grad_rejected});
    return computed.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // One entry per forward argument: policy_chosen, policy_rejected, and none for `computed`.
    variable_list grads(3);
    const variable_list saved = ctx->get_saved_variables();
    std::tie(grads[0], grads[1]) = call_backward(grad_outputs[0], saved[0], saved[1]);
    return grads;
  }
};

DpoLossResult dpo_loss_forward_autograd(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                        const std::optional<at::Tensor>& ref_chosen,
                                        const std::optional<at::Tensor>& ref_rejected,
                                        const std::optional<at::Tensor>& chosen_lengths,
                                        const std::optional<at::Tensor>& rejected_lengths,
                                        at::IntArrayRef loss_types, at::ArrayRef<double> params, bool average) {
  // The same op below the Autograd key: the CPU or CUDA kernel.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dpo_kernels::dpo_loss_forward", "")
                             .typed<decltype(dpo_loss_forward_autograd)>();
  DpoLossResult out;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op.call(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
                  loss_types, params, average);
  }
  // Without grad mode or a policy input that requires grad (reference model, eval, dpo_loss_and_grads) no node is
  // built. Reference log-probs and lengths are constants: a gradient never flows into them.
  if (torch::autograd::compute_requires_grad(policy_chosen, policy_rejected)) {
    std::get<0>(out) = DpoLossFunction::apply(
        policy_chosen, policy_rejected, LossAndCoefficients{std::get<0>(out), std::get<6>(out), std::get<7>(out)});
  }
  return out;
}

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, Autograd, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_autograd);
}
