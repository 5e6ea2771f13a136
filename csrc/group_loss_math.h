// Per-group (ranked-list) DPO loss math shared by the CPU kernel and the CUDA kernel, beside the pairwise math of
// dpo_loss_math.h, whose pair terms all_pairs reuses.
//
// A batch holds G groups, each of K responses to one prompt (2 <= K <= kMaxGroupSize, K may differ between groups),
// their R responses concatenated group by group; `offsets` [G + 1] delimits them. With p, f the policy's and the
// reference's log-probs of a response (f = 0 reference-free), u = p - f and r = beta u its reward; each group's
// responses ordered best first: by descending score, ties keeping their given order (a stable sort), or as given when
// there are no scores:
//
//   plackett_luce  Plackett-Luce DPO (Rafailov et al. 2023, Appendix A.3):
//                  sum_{k=1}^{m} [log sum_{j=k}^{K} exp(r_j) - r_k], the negative log-likelihood of the first m
//                  places of the ranking; m = K - 1 (the full ranking) or min(top_k, K - 1). top_k = 1 is the best
//                  response against all the others (one softmax). Each term is computed as
//                  M + log1p(sum_{j != a} exp(d_j - M)) over d_j = beta (u_j - u_k), j >= k (d_k = 0), M = max d_j
//                  at a (k itself on a tie): at K = 2 that is, operation for operation, the sigmoid term
//                  -logsig(beta (u_1 - u_2)) of dpo_loss_math.h, so plackett_luce at K = 2 is sigmoid DPO to the bit.
//   all_pairs      a pairwise loss type X (any of dpo_loss_math.h that reads one pair alone, with its settings) on
//                  every ordered pair (i better than j by score; tied pairs skipped), as GroupDPO (arXiv 2604.15602)
//                  and the pairwise expansion of a list: the group's loss is the mean of X over its ordered pairs,
//                  or with score-gap weighting sum w_ij X_ij / sum w_ij, w_ij = s_i - s_j. A group without an ordered
//                  pair is left out of the batch mean and counted. At K = 2 it is X on the one pair.
//   best_vs_worst  X on the one pair of the best and the worst response by score (the usual binarization of a
//                  list); left out like all_pairs when the two are tied.
//   sft            (optional, weight w_sft) the NLL of each group's best response, as the pairwise sft term:
//                  -sum_g p_best / sum_g l_best over the groups in the mean, the length sum clamped to >= 1 (from
//                  per-token means, the op's `average`: -sum p_best l_best / sum l_best), the same value for every
//                  group (Pang et al. 2024; GroupDPO finds an NLL term necessary).
//
// loss = w_rank sum_{g in the mean} L_g / max(N, 1) + w_sft sft, N the number of groups in the mean; losses[g] is
// w_rank L_g + w_sft sft (0 for a group left out), so `loss` is the mean of the kept entries. Rewards are r for every
// response. ranking_accuracy: over the batch's ordered (untied) pairs, the fraction with r_i > r_j (strict, as the
// pairwise reward accuracy). top1_accuracy: over the groups with an ordered pair, the fraction whose best-scored
// responses hold a reward above every lower-scored response's (strict). Both are 0 without any such pair.
#pragma once

#include "dpo_loss_math.h"

namespace dpo_kernels {

// The index of each name in dpo_kernels/loss_op/group_spec.py GROUP_LOSS_TYPES (the Python wrapper passes that
// index; the tests against the reference fail where the two disagree).
enum GroupLossType : int {
  kPlackettLuce = 0,
  kAllPairs,
  kBestVsWorst,
  kNumGroupLossTypes
};

// The largest group: one thread holds a group's responses in local arrays.
constexpr int kMaxGroupSize = 16;

// The rows of the group op's `params`: each a full row of enum HyperParam, read as the pairwise op reads a term's.
// The ranking term's row gives beta and its pair loss's settings; the sft row's loss_weights is w_sft.
enum GroupTerm : int {
  kRankingTerm = 0,
  kSftTerm,
  kNumGroupTerms
};

template <typename T>
struct GroupLossArgs {
  int64_t num_groups;
  const int64_t* offsets;  // [G + 1]
  const T* policy;         // [R]
  const T* ref;            // [R], null: reference-free (0)
  const double* scores;    // [R], null: every group is ordered best first
  const T* lengths;        // [R], null unless a term reads them
  int group_loss;          // GroupLossType
  int pair_loss;           // LossType of all_pairs and best_vs_worst
  int top_k;               // plackett_luce's m: 0 for K - 1
  bool score_gap;          // all_pairs: weigh each pair by its score gap
  bool from_means;         // the log-probs are per-token means (the op's `average`)
  T params[kNumGroupTerms][kNumHyperParams];
  // Outputs.
  T* losses;              // [G]
  T* rewards;             // [R]
  T* grad;                // [R]: dloss/dlogp
  int64_t* best;          // [G] scratch: each kept group's best response (global index), -1 for a group left out
  T* loss;                // []
  T* ranking_accuracy;    // []
  T* top1_accuracy;       // []
  int64_t* groups_left_out;  // []
};

// One group's contribution to the batch sums.
struct GroupPartial {
  double loss;      // w_rank L_g of the kept groups
  double sft_logp;  // p_best (p_best l_best from means) of the kept groups
  double sft_len;   // l_best of the kept groups
  long long kept;
  long long pairs;
  long long correct_pairs;
  long long ranked_groups;  // groups with an ordered pair
  long long top1_correct;
};

DPO_HD GroupPartial group_partial_zero() { return GroupPartial{0.0, 0.0, 0.0, 0, 0, 0, 0, 0}; }

DPO_HD void add_partial(GroupPartial& s, const GroupPartial& o) {
  s.loss += o.loss, s.sft_logp += o.sft_logp, s.sft_len += o.sft_len, s.kept += o.kept, s.pairs += o.pairs;
  s.correct_pairs += o.correct_pairs, s.ranked_groups += o.ranked_groups, s.top1_correct += o.top1_correct;
}

// Plackett-Luce's term k over the remaining responses order[k..K-1] (u in given positions): adds its value to
// `value` and its derivatives w.r.t. u to `du`.
template <typename T>
DPO_HD void plackett_luce_term(T beta, const T* u, const int* order, int k, int size, T& value, T* du) {
  const T uk = u[order[k]];
  T d[kMaxGroupSize];
  int top = k;  // the argmax of d, k itself on a tie
  T max_d = T(0);
  for (int j = k + 1; j < size; ++j) {
    d[j] = beta * (u[order[j]] - uk);
    if (d[j] > max_d) max_d = d[j], top = j;
  }
  d[k] = T(0);
  T rest = T(0);
  for (int j = k; j < size; ++j) {
    if (j != top) rest += dk_exp(d[j] - max_d);
  }
  value += max_d + dk_log1p(rest);
  const T total = T(1) + rest;
  T others = T(0);  // the softmax mass of the responses ranked below k, whose negation is d term / d u_k / beta
  for (int j = k + 1; j < size; ++j) {
    const T share = (j == top ? T(1) : dk_exp(d[j] - max_d)) / total;
    du[order[j]] += beta * share;
    others += share;
  }
  du[order[k]] += beta * -others;
}

// Group g: writes its rewards, its loss term (w_rank not applied) to losses[g], d L_g / d logp to grad (in the
// group's given positions), best[g]; returns its share of the batch sums.
template <typename T>
DPO_HD GroupPartial group_forward(const GroupLossArgs<T>& a, int64_t g) {
  GroupPartial s = group_partial_zero();
  const int64_t first = a.offsets[g];
  const int64_t size64 = a.offsets[g + 1] - first;
  if (size64 < 2 || size64 > kMaxGroupSize) {
    // The host checks sizes before the launch; a bad one reached the device anyway: NaN, never a wild access.
    a.losses[g] = T(NAN);
    a.best[g] = -1;
    s.loss = static_cast<double>(NAN), s.kept = 1;
    return s;
  }
  const int size = static_cast<int>(size64);
  const T* row = a.params[kRankingTerm];
  const T beta = row[kBeta];
  T u[kMaxGroupSize], du[kMaxGroupSize];
  double score[kMaxGroupSize];
  int order[kMaxGroupSize];
  for (int i = 0; i < size; ++i) {
    const T f = a.ref ? a.ref[first + i] : T(0);
    u[i] = a.policy[first + i] - f;
    a.rewards[first + i] = beta * u[i];
    du[i] = T(0);
    score[i] = a.scores ? a.scores[first + i] : static_cast<double>(size - i);
    // Insertion sort, descending and stable: a response passes an earlier one only with a strictly higher score.
    int j = i;
    while (j > 0 && score[order[j - 1]] < score[i]) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = i;
  }

  // Ranking metrics over the ordered pairs (i before j in the order, with a strictly higher score).
  T best_other = T(0);
  bool has_other = false;
  T top_reward = a.rewards[first + order[0]];
  for (int i = 0; i < size; ++i) {
    const T ri = a.rewards[first + order[i]];
    if (score[order[i]] == score[order[0]]) {
      top_reward = ri > top_reward ? ri : top_reward;
    } else if (!has_other || ri > best_other || ri != ri) {  // a NaN below the top: no reward is above it
      best_other = ri, has_other = true;
    }
    for (int j = i + 1; j < size; ++j) {
      if (score[order[i]] > score[order[j]]) {
        s.pairs += 1;
        s.correct_pairs += ri > a.rewards[first + order[j]] ? 1 : 0;
      }
    }
  }
  if (has_other) {
    s.ranked_groups = 1;
    s.top1_correct = top_reward > best_other ? 1 : 0;
  }

  T value = T(0);
  bool kept = true;
  if (a.group_loss == kPlackettLuce) {
    const int m = a.top_k > 0 && a.top_k < size - 1 ? a.top_k : size - 1;
    for (int k = 0; k < m; ++k) plackett_luce_term(beta, u, order, k, size, value, du);
  } else {
    const bool normalized = reads_norm_lengths(a.pair_loss);
    T weight_sum = T(0);
    const int last = size - 1;
    for (int i = 0; i < size; ++i) {
      for (int j = i + 1; j < size; ++j) {
        if (a.group_loss == kBestVsWorst && (i != 0 || j != last)) continue;
        const int hi = order[i], lo = order[j];
        if (!(score[hi] > score[lo])) continue;
        const T w = a.score_gap ? static_cast<T>(score[hi] - score[lo]) : T(1);
        const PairLogps<T> in{a.policy[first + hi], a.policy[first + lo], a.ref ? a.ref[first + hi] : T(0),
                              a.ref ? a.ref[first + lo] : T(0),
                              normalized ? (a.from_means ? T(1) : clamp_len(a.lengths, first + hi)) : T(1),
                              normalized ? (a.from_means ? T(1) : clamp_len(a.lengths, first + lo)) : T(1)};
        T v, dc, dr;
        pair_term(a.pair_loss, row, in, v, dc, dr);
        value += w * v;
        du[hi] += w * dc;
        du[lo] += w * dr;
        weight_sum += w;
      }
    }
    kept = weight_sum > T(0);
    if (kept && weight_sum != T(1)) {
      value /= weight_sum;
      for (int i = 0; i < size; ++i) du[i] /= weight_sum;
    }
  }
  for (int i = 0; i < size; ++i) a.grad[first + i] = kept ? du[i] : T(0);
  if (!kept) {
    a.losses[g] = T(0);
    a.best[g] = -1;
    return s;
  }
  const T weighted = row[kLossWeights] * value;
  a.losses[g] = weighted;
  a.best[g] = first + order[0];
  s.kept = 1;
  s.loss = static_cast<double>(weighted);
  if (a.lengths) {
    const T len = a.lengths[first + order[0]];
    const T p = a.policy[first + order[0]];
    s.sft_logp = static_cast<double>(a.from_means ? p * len : p);
    s.sft_len = static_cast<double>(len);
  }
  return s;
}

// The batch's scalars from the total of every group's partial: writes loss and metrics, returns the sft term's
// value (0 without it) for group_finish.
template <typename T>
DPO_HD T write_group_scalars(const GroupLossArgs<T>& a, const GroupPartial& total) {
  const double kept = total.kept > 0 ? static_cast<double>(total.kept) : 1.0;
  double loss = total.loss / kept;
  T sft = T(0);
  const T w_sft = a.params[kSftTerm][kLossWeights];
  if (w_sft != T(0)) {
    const double total_len = total.sft_len < 1.0 ? 1.0 : total.sft_len;
    sft = static_cast<T>(-total.sft_logp / total_len);
    loss += static_cast<double>(w_sft * sft);
  }
  *a.loss = static_cast<T>(loss);
  const double pairs = static_cast<double>(total.pairs);
  *a.ranking_accuracy = static_cast<T>(total.pairs > 0 ? static_cast<double>(total.correct_pairs) / pairs : 0.0);
  *a.top1_accuracy = static_cast<T>(
      total.ranked_groups > 0 ? static_cast<double>(total.top1_correct) / static_cast<double>(total.ranked_groups)
                              : 0.0);
  *a.groups_left_out = static_cast<int64_t>(a.num_groups) - static_cast<int64_t>(total.kept);
  return sft;
}

// Group g once the batch sums are known: scales its coefficients by w_rank / N, adds the sft term's value to
// losses[g] and its gradient to the best response's coefficient.
template <typename T>
DPO_HD void group_finish(const GroupLossArgs<T>& a, int64_t g, T inv_kept, T sft, T total_len) {
  const int64_t best = a.best[g];
  if (best < 0) return;
  const T scale = a.params[kRankingTerm][kLossWeights] * inv_kept;
  for (int64_t i = a.offsets[g]; i < a.offsets[g + 1]; ++i) a.grad[i] = scale * a.grad[i];
  const T w_sft = a.params[kSftTerm][kLossWeights];
  if (w_sft != T(0)) {
    a.losses[g] += w_sft * sft;
    a.grad[best] += w_sft * (-(a.from_means ? a.lengths[best] : T(1)) / total_len);
  }
}

}  // namespace dpo_kernels
