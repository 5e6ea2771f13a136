// The group DPO loss op's schema and the host code shared by its CPU and CUDA implementations.
#include "group_loss_op.h"

#include <torch/library.h>

namespace dpo_kernels {
namespace {

// The names the errors give the op and its [R] policy log-probs, which the per-response inputs match.
constexpr const char* kOp = "group_dpo_loss";
constexpr const char* kPolicy = "policy_logps";

// Only on the CPU, where reading the offsets costs no device synchronization; on a GPU the Python wrapper has
// checked the sizes and the kernel turns a bad one into NaN.
void check_offsets_values(const at::Tensor& offsets, int64_t responses) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t groups = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[groups] == responses, "group_dpo_loss: the group offsets must run from 0 to R = ",
              responses, ", got ", o[0], " to ", o[groups]);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = o[g + 1] - o[g];
    TORCH_CHECK(size >= 2 && size <= kMaxGroupSize, "group_dpo_loss: group ", g, " has ", size,
                " responses; a group needs between 2 and ", kMaxGroupSize);
  }
}

}  // namespace

GroupLossBuffers prepare_group_loss(const GroupLossInputs& in) {
  const at::Tensor& policy = in.policy;
  TORCH_CHECK(policy.dim() == 1 && policy.numel() >= 2,
              "group_dpo_loss: policy_logps must be a 1-D [R] tensor of at least one group, got shape ",
              policy.sizes());
  const at::ScalarType dtype = policy.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "group_dpo_loss: the op computes in float32 or float64, got ", dtype);
  TORCH_CHECK(in.offsets.dim() == 1 && in.offsets.numel() >= 2 && in.offsets.scalar_type() == at::kLong,
              "group_dpo_loss: group offsets must be a 1-D int64 [G + 1] tensor, got shape ", in.offsets.sizes(),
              " of ", in.offsets.scalar_type());
  TORCH_CHECK(in.offsets.device() == policy.device(), "group_dpo_loss: group offsets are on ", in.offsets.device(),
              " but policy_logps is on ", policy.device());
  TORCH_CHECK(in.group_loss >= 0 && in.group_loss < kNumGroupLossTypes, "group_dpo_loss: unknown group loss code ",
              in.group_loss);
  TORCH_CHECK(static_cast<int64_t>(in.params.size()) == kNumGroupTerms * kNumHyperParams,
              "group_dpo_loss: params needs ", kNumHyperParams, " hyper-parameters (HYPER_PARAMS' order) for each of ",
              kNumGroupTerms, " terms (ranking, sft), got ", in.params.size(), " values");
  TORCH_CHECK(in.top_k >= 0, "group_dpo_loss: top_k must be >= 0 (0: the full ranking), got ", in.top_k);
  const bool pairwise = in.group_loss != kPlackettLuce;
  if (pairwise) {
    TORCH_CHECK(in.pair_loss >= 0 && in.pair_loss < kNumLossTypes && in.pair_loss != kAot &&
                    in.pair_loss != kAotUnpaired && in.pair_loss != kSft,
                "group_dpo_loss: pair loss code ", in.pair_loss,
                " is not a loss type of one pair (aot, aot_unpaired and sft couple the batch)");
  }
  GroupLossBuffers b;
  b.policy = policy.contiguous();
  b.offsets = in.offsets.contiguous();
  b.ref = vector_like(in.ref, policy, dtype, kOp, kPolicy, "ref_logps");
  b.scores = vector_like(in.scores, policy, at::kDouble, kOp, kPolicy, "scores");
  b.lengths = vector_like(in.lengths, policy, dtype, kOp, kPolicy, "lengths");
  TORCH_CHECK(!in.score_gap || b.scores.defined(), "group_dpo_loss: score-gap weighting needs scores");
  TORCH_CHECK(!(pairwise && reads_norm_lengths(static_cast<int>(in.pair_loss))) || b.lengths.defined(),
              "group_dpo_loss: ipo, sigmoid_norm and simpo are length-normalized: pass lengths");
  TORCH_CHECK(in.params[kSftTerm * kNumHyperParams + kLossWeights] == 0.0 || b.lengths.defined(),
              "group_dpo_loss: the sft term needs lengths");
  if (policy.device().is_cpu()) check_offsets_values(b.offsets, policy.numel());

  const at::TensorOptions options = policy.options();
  const int64_t groups = b.offsets.numel() - 1;
  b.best = at::empty({groups}, options.dtype(at::kLong));
  b.loss = at::empty({}, options);
  b.ranking_accuracy = at::empty({}, options);
  b.top1_accuracy = at::empty({}, options);
  b.groups_left_out = at::empty({}, options.dtype(at::kLong));
  b.losses = at::empty({groups}, options);
  b.rewards = at::empty({policy.numel()}, options);
  b.grad = at::empty({policy.numel()}, options);
  return b;
}

template <typename T>
GroupLossArgs<T> make_group_loss_args(GroupLossBuffers& b, const GroupLossInputs& in) {
  GroupLossArgs<T> a{};
  a.num_groups = b.offsets.numel() - 1;
  a.offsets = b.offsets.data_ptr<int64_t>();
  a.policy = b.policy.data_ptr<T>();
  a.ref = ptr_or_null<T>(b.ref);
  a.scores = ptr_or_null<double>(b.scores);
  a.lengths = ptr_or_null<T>(b.lengths);
  a.group_loss = static_cast<int>(in.group_loss);
  a.pair_loss = static_cast<int>(in.pair_loss);
  a.top_k = static_cast<int>(std::min<int64_t>(in.top_k, kMaxGroupSize));
  a.score_gap = in.score_gap;
  a.from_means = in.average;
  for (int t = 0; t < kNumGroupTerms; ++t) {
    for (int k = 0; k < kNumHyperParams; ++k) a.params[t][k] = static_cast<T>(in.params[t * kNumHyperParams + k]);
  }
  a.losses = b.losses.data_ptr<T>();
  a.rewards = b.rewards.data_ptr<T>();
  a.grad = b.grad.data_ptr<T>();
  a.best = b.best.data_ptr<int64_t>();
  a.loss = b.loss.data_ptr<T>();
  a.ranking_accuracy = b.ranking_accuracy.data_ptr<T>();
  a.top1_accuracy = b.top1_accuracy.data_ptr<T>();
  a.groups_left_out = b.groups_left_out.data_ptr<int64_t>();
  return a;
}

template GroupLossArgs<float> make_group_loss_args<float>(GroupLossBuffers&, const GroupLossInputs&);
template GroupLossArgs<double> make_group_loss_args<double>(GroupLossBuffers&, const GroupLossInputs&);

GroupLossResult group_results(const GroupLossBuffers& b) {
  return {b.loss, b.losses, b.rewards, b.ranking_accuracy, b.top1_accuracy, b.groups_left_out, b.grad};
}

GroupLossBackwardArgs prepare_group_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 1 && (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble),
              "group_loss_backward: the coefficients must be a float32 or float64 [R] vector, got shape ",
              grad.sizes(), " of ", grad.scalar_type());
  GroupLossBackwardArgs a;
  a.grad_loss = upstream_grad(grad_loss, grad.scalar_type(), "group_loss_backward");
  TORCH_CHECK(grad_loss.device() == grad.device(), "group_loss_backward: grad_loss is on ", grad_loss.device(),
              " but the coefficients are on ", grad.device());
  a.grad = grad.contiguous();
  return a;
}

}  // namespace dpo_kernels

TORCH_LIBRARY_FRAGMENT(dpo_kernels, m) {
  // One call for every group of the batch: the mean loss over the groups it keeps, each group's loss, each response's
  // reward, the ranking metrics, how many groups were left out (all_pairs or best_vs_worst without an ordered pair),
  // and dloss/dlogp per response. `offsets` [G + 1] delimits the groups in the [R] vectors; `params` holds the
  // ranking term's hyper-parameters, then the sft term's, each row in the order of enum HyperParam.
  m.def(
      "group_loss_forward(Tensor policy, Tensor? ref, Tensor offsets, Tensor? scores, Tensor? lengths, "
      "int group_loss, int pair_loss, int top_k, bool score_gap, float[] params, bool average=False) -> "
      "(Tensor loss, Tensor losses, Tensor rewards, Tensor ranking_accuracy, Tensor top1_accuracy, "
      "Tensor groups_left_out, Tensor grad)");
  // The backward of group_loss_forward: grad_loss (a scalar) times the saved coefficients, in one launch.
  m.def("group_loss_backward(Tensor grad_loss, Tensor grad) -> Tensor");
}
