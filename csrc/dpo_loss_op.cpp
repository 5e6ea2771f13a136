// The op's schema and the host code shared by the CPU and CUDA implementations.
#include "dpo_loss_op.h"

#include <torch/library.h>

namespace dpo_kernels {
namespace {

// An optional [B] input beside policy_chosen: its shape, device and dtype.
at::Tensor optional_or_undefined(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  return vector_like(t, like, like.scalar_type(), "dpo_loss", "policy_chosen_logps", name);
}

bool uses(at::IntArrayRef types, LossType type) {
  for (int64_t t : types) {
    if (t == type) return true;
  }
  return false;
}

// Sorted values and, for each element, the position it was sorted to (the inverse permutation), so that the kernel
// only gathers. A stable sort makes ties deterministic.
std::tuple<at::Tensor, at::Tensor> sort_with_rank(const at::Tensor& x) {
  auto [values, order] = at::sort(x, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor rank = at::empty_like(order);
  rank.scatter_(0, order, at::arange(x.size(0), order.options()));
  return {values.contiguous(), rank};
}

}  // namespace

DpoLossBuffers prepare_dpo_loss(const DpoLossInputs& in) {
  TORCH_CHECK(in.policy_chosen.dim() == 1 && in.policy_chosen.numel() > 0,
              "dpo_loss: policy_chosen_logps must be a non-empty 1-D [B] tensor, got shape ",
              in.policy_chosen.sizes());
  TORCH_CHECK(in.policy_chosen.scalar_type() == at::kFloat || in.policy_chosen.scalar_type() == at::kDouble,
              "dpo_loss: the op computes in float32 or float64, got ", in.policy_chosen.scalar_type());
  const int64_t num_terms = static_cast<int64_t>(in.loss_types.size());
  TORCH_CHECK(num_terms >= 1 && num_terms <= kMaxTerms, "dpo_loss: between 1 and ", kMaxTerms,
              " loss types, got ", num_terms);
  TORCH_CHECK(static_cast<int64_t>(in.params.size()) == num_terms * kNumHyperParams, "dpo_loss: params needs ",
              kNumHyperParams, " hyper-parameters per loss type (HYPER_PARAMS' order), got ", in.params.size(),
              " values for ", num_terms, " loss types");
  // The rewards and metrics are of the call, not of a term: they read one beta.
  for (int64_t t = 1; t < num_terms; ++t) {
    TORCH_CHECK(in.params[t * kNumHyperParams + kBeta] == in.params[kBeta],
                "dpo_loss: beta must be the same for every loss type, got ", in.params[kBeta], " and ",
                in.params[t * kNumHyperParams + kBeta]);
  }
  for (int64_t t : in.loss_types) {
    TORCH_CHECK(t >= 0 && t < kNumLossTypes, "dpo_loss: unknown loss type code ", t);
  }
  DpoLossBuffers b;
  b.policy_chosen = in.policy_chosen.contiguous();
  b.policy_rejected = optional_or_undefined(in.policy_rejected, in.policy_chosen, "policy_rejected_logps");
  b.ref_chosen = optional_or_undefined(in.ref_chosen, in.policy_chosen, "ref_chosen_logps");
  b.ref_rejected = optional_or_undefined(in.ref_rejected, in.policy_chosen, "ref_rejected_logps");
  TORCH_CHECK(b.ref_chosen.defined() == b.ref_rejected.defined(),
              "dpo_loss: pass both reference log-prob tensors or neither");
  b.chosen_lengths = optional_or_undefined(in.chosen_lengths, in.policy_chosen, "chosen_lengths");
  b.rejected_lengths = optional_or_undefined(in.rejected_lengths, in.policy_chosen, "rejected_lengths");
  const bool needs_both =
      uses(in.loss_types, kIpo) || uses(in.loss_types, kSigmoidNorm) || uses(in.loss_types, kSimpo);
  TORCH_CHECK(!needs_both || (b.chosen_lengths.defined() && b.rejected_lengths.defined()),
              "dpo_loss: ipo, sigmoid_norm and simpo are length-normalized: pass chosen and rejected lengths");
  TORCH_CHECK(!uses(in.loss_types, kSft) || b.chosen_lengths.defined(), "dpo_loss: sft needs chosen_lengths");

  const at::Tensor& pc = b.policy_chosen;
  const at::Tensor& pr = b.policy_rejected;
  if (uses(in.loss_types, kAot)) {
    std::tie(b.aot_sorted_policy, b.aot_rank) = sort_with_rank(pc - pr);
    b.aot_sorted_ref = b.ref_chosen.defined()
                           ? std::get<0>(at::sort(b.ref_chosen - b.ref_rejected, true, 0, false)).contiguous()
                           : at::zeros_like(pc);
  }
  if (uses(in.loss_types, kAotUnpaired)) {
    const at::Tensor chosen_ratio = b.ref_chosen.defined() ? pc - b.ref_chosen : pc;
    const at::Tensor rejected_ratio = b.ref_rejected.defined() ? pr - b.ref_rejected : pr;
    std::tie(b.aotu_sorted_chosen, b.aotu_rank_chosen) = sort_with_rank(chosen_ratio);
    std::tie(b.aotu_sorted_rejected, b.aotu_rank_rejected) = sort_with_rank(rejected_ratio);
  }
  if (uses(in.loss_types, kSft)) {
    // From per-token means (average), mean * count is each response's token sum.
    const at::Tensor token_sum = in.average ? (pc * b.chosen_lengths).sum() : pc.sum();
    b.sft_sums = at::stack({token_sum, b.chosen_lengths.sum()}).contiguous();
  }
  b.from_means = in.average;
  // at::empty rather than empty_like: one dispatcher hop fewer per output, which counts at launch-bound sizes.
  const at::TensorOptions options = pc.options();
  const int64_t batch = pc.size(0);
  b.loss = at::empty({}, options);
  b.reward_accuracy = at::empty({}, options);
  b.reward_margin = at::empty({}, options);
  b.losses = at::empty({batch}, options);
  b.chosen_rewards = at::empty({batch}, options);
  b.rejected_rewards = at::empty({batch}, options);
  b.grad_chosen = at::empty({batch}, options);
  b.grad_rejected = at::empty({batch}, options);
  return b;
}

template <typename T>
DpoLossArgs<T> make_dpo_loss_args(DpoLossBuffers& b, const DpoLossInputs& in) {
  DpoLossArgs<T> a{};
  a.batch = b.policy_chosen.size(0);
  a.policy_chosen = b.policy_chosen.data_ptr<T>();
  a.policy_rejected = b.policy_rejected.data_ptr<T>();
  a.ref_chosen = ptr_or_null<T>(b.ref_chosen);
  a.ref_rejected = ptr_or_null<T>(b.ref_rejected);
  a.chosen_lengths = ptr_or_null<T>(b.chosen_lengths);
  a.rejected_lengths = ptr_or_null<T>(b.rejected_lengths);
  a.num_terms = static_cast<int>(in.loss_types.size());
  for (int i = 0; i < a.num_terms; ++i) {
    a.types[i] = static_cast<int>(in.loss_types[i]);
    for (int k = 0; k < kNumHyperParams; ++k) {
      a.params[i][k] = static_cast<T>(in.params[i * kNumHyperParams + k]);
    }
  }
  a.aot_sorted_policy = ptr_or_null<T>(b.aot_sorted_policy);
  a.aot_sorted_ref = ptr_or_null<T>(b.aot_sorted_ref);
  a.aot_rank = ptr_or_null<int64_t>(b.aot_rank);
  a.aotu_sorted_chosen = ptr_or_null<T>(b.aotu_sorted_chosen);
  a.aotu_sorted_rejected = ptr_or_null<T>(b.aotu_sorted_rejected);
  a.aotu_rank_chosen = ptr_or_null<int64_t>(b.aotu_rank_chosen);
  a.aotu_rank_rejected = ptr_or_null<int64_t>(b.aotu_rank_rejected);
  a.sft_sums = ptr_or_null<T>(b.sft_sums);
  a.from_means = b.from_means;
  a.losses = b.losses.data_ptr<T>();
  a.chosen_rewards = b.chosen_rewards.data_ptr<T>();
  a.rejected_rewards = b.rejected_rewards.data_ptr<T>();
  a.grad_chosen = b.grad_chosen.data_ptr<T>();
  a.grad_rejected = b.grad_rejected.data_ptr<T>();
  a.loss = b.loss.data_ptr<T>();
  a.reward_accuracy = b.reward_accuracy.data_ptr<T>();
  a.reward_margin = b.reward_margin.data_ptr<T>();
  return a;
}

template DpoLossArgs<float> make_dpo_loss_args<float>(DpoLossBuffers&, const DpoLossInputs&);
template DpoLossArgs<double> make_dpo_loss_args<double>(DpoLossBuffers&, const DpoLossInputs&);

DpoLossResult results(const DpoLossBuffers& b) {
  return {b.loss, b.losses, b.chosen_rewards, b.rejected_rewards, b.reward_accuracy, b.reward_margin, b.grad_chosen,
          b.grad_rejected};
}

DpoLossBackwardArgs prepare_dpo_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                              const at::Tensor& grad_rejected) {
  TORCH_CHECK(grad_chosen.dim() == 1 && grad_rejected.sizes() == grad_chosen.sizes(),
              "dpo_loss_backward: grad_chosen and grad_rejected must be [B] vectors of one shape, got ",
              grad_chosen.sizes(), " and ", grad_rejected.sizes());
  TORCH_CHECK(grad_chosen.scalar_type() == grad_rejected.scalar_type() &&
                  (grad_chosen.scalar_type() == at::kFloat || grad_chosen.scalar_type() == at::kDouble),
              "dpo_loss_backward: the coefficients must both be float32 or float64, got ", grad_chosen.scalar_type(),
              " and ", grad_rejected.scalar_type());
  DpoLossBackwardArgs a;
  a.grad_loss = upstream_grad(grad_loss, grad_chosen.scalar_type(), "dpo_loss_backward");
  TORCH_CHECK(grad_loss.device() == grad_chosen.device() && grad_rejected.device() == grad_chosen.device(),
              "dpo_loss_backward: tensors on different devices: grad_loss on ", grad_loss.device(),
              ", grad_chosen on ", grad_chosen.device(), ", grad_rejected on ", grad_rejected.device());
  a.grad_chosen = grad_chosen.contiguous();
  a.grad_rejected = grad_rejected.contiguous();
  return a;
}

}  // namespace dpo_kernels

TORCH_LIBRARY(dpo_kernels, m) {
  // One call: the batch-mean loss and its per-pair terms, the rewards and metrics, and dloss/dlogp per sequence.
  // `params` holds every hyper-parameter of each loss type in turn, each row in the order of enum HyperParam
  // (dpo_loss_math.h), which is HYPER_PARAMS' order.
  m.def(
      "dpo_loss_forward(Tensor policy_chosen, Tensor policy_rejected, Tensor? ref_chosen, Tensor? ref_rejected, "
      "Tensor? chosen_lengths, Tensor? rejected_lengths, int[] loss_types, float[] params, bool average=False) -> "
      "(Tensor loss, Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards, Tensor reward_accuracy, "
      "Tensor reward_margin, Tensor grad_chosen, Tensor grad_rejected)");
  // The backward of dpo_loss_forward: grad_loss (a scalar) times the saved coefficients, in one launch.
  m.def("dpo_loss_backward(Tensor grad_loss, Tensor grad_chosen, Tensor grad_rejected) -> (Tensor, Tensor)");
}
