// Per-pair DPO loss math shared by the CPU kernel and the CUDA kernel, so the two cannot drift.
//
// Everything here is plain arithmetic on raw pointers: no ATen, no CUDA runtime. Each loss term returns its value
// and its derivatives w.r.t. the policy's chosen and rejected log-probs; `dpo_pair` combines the terms of one pair
// into the pair's loss and its final coefficients dL/dlogp of the batch-mean loss.
//
// The formulas: this comment is their one statement; dpo_kernels/reference.py restates them as PyTorch code, and
// dpo_kernels/loss_op/loss_types.py holds each loss's summary, hyper-parameter ranges and structural facts. They
// follow TRL 1.16's DPOTrainer unless noted. With pc, pr the policy's and rc, rr the reference's summed log-probs of
// the chosen and rejected responses (rc = rr = 0 reference-free), c = pc - rc, r = pr - rr, z = beta (c - r),
// eps the term's label smoothing, lc, lr the response lengths clamped to >= 1 (1 for ipo, sigmoid_norm and simpo when
// the log-probs are per-token means, the op's `average`: they are length-normalized already), sig the logistic
// function:
//
//   sigmoid       DPO (Rafailov et al. 2023): -logsig(z); with eps > 0 conservative DPO (cDPO, Mitchell 2023)
//                 -(1-eps) logsig(z) - eps logsig(-z). TRL 1.16 ignores label_smoothing here: pass 0 (or a
//                 per-loss list) to reproduce TRL.
//   hinge         SLiC (Zhao et al. 2023): relu(1 - z).
//   ipo           IPO (Azar et al. 2023): (c/lc - r/lr - 1/(2 beta))^2. TRL length-normalizes the log-ratios
//                 (confirmed with the IPO authors); the paper's Eq. 17 uses the sums. We follow TRL.
//   exo_pair      EXO (Ji et al. 2024): sig(z)(logsig(z) - log(1-eps)) + sig(-z)(logsig(-z) - log(eps)), 0 < eps < 1.
//   nca_pair      NCA (Chen et al. 2024): -logsig(beta c) - logsig(-beta c)/2 - logsig(-beta r)/2.
//   robust        rDPO (Chowdhury et al. 2024): (-(1-eps) logsig(z) + eps logsig(-z)) / (1 - 2 eps), 0 <= eps < 0.5.
//   bco_pair      BCO (Jung et al. 2024): -logsig(beta c) - logsig(-beta r). Stateless: TRL 1.16's bco_pair has no
//                 running reward mean (older TRL subtracted one).
//   sppo_hard     SPPO, hard labels (Wu et al. 2024): (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2.
//   aot           AOT (Melnyk et al. 2024): the sigmoid loss (with eps) on beta (sort(pc - pr)[k] - sort(rc - rr)[k]),
//   aot_unpaired  resp. beta (sort(c)[k] - sort(r)[k]), the sorts over the batch (stable, in the host code: a sort is
//                 not a per-pair map); pair k's entry of `losses` is the k-th sorted position, and each pair's
//                 gradient is gathered from the position it was sorted to.
//   apo_zero      APO (D'Oosterlinck et al. 2024): 1 - sig(beta c) + sig(beta r).
//   apo_down      APO: sig(beta c) + 1 - sig(z).
//   discopop      DiscoPOP (Lu et al. 2024): -logsig(z)(1 - m) + exp(-z) m, m = sig(z / tau).
//   sigmoid_norm  length-normalized DPO, as TRL: -logsig(beta (c/lc - r/lr)).
//   sft           the NLL of the chosen responses, as TRL adds it (e.g. RPO, Pang et al. 2024): -sum(pc) / sum(lc)
//                 over the batch, the same value for every pair, sum(lc) clamped to >= 1 (0 when no chosen token is
//                 scored). From per-token means (the op's `average`), -sum(pc * lc) / sum(lc): the same mean NLL.
//   simpo         SimPO (Meng et al. 2024), reference-free (ignores rc, rr): the sigmoid loss (with eps) on
//                 beta (pc/lc - pr/lr) - gamma.
//   dpop          DPO-Positive (Pal et al. 2024): -logsig(beta (c - r - dpop_lambda max(0, rc - pc))).
//
// Rewards are beta (policy - ref) for every loss type; the accuracy counts chosen reward > rejected reward (strict),
// as TRL logs them. TRL's f_divergence_type, ld_alpha and use_weighting are not part of this op.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DPO_HD __host__ __device__ __forceinline__
#else
#define DPO_HD inline
#endif

namespace dpo_kernels {

// The index of each name in dpo_kernels/loss_op/loss_types.py LOSS_TYPES (tests/loss_op/test_loss_types.py
// checks that the two agree).
enum LossType : int {
  kSigmoid = 0,
  kHinge,
  kIpo,
  kExoPair,
  kNcaPair,
  kRobust,
  kBcoPair,
  kSppoHard,
  kAot,
  kAotUnpaired,
  kApoZero,
  kApoDown,
  kDiscopop,
  kSigmoidNorm,
  kSft,
  kSimpo,
  kDpop,
  kNumLossTypes
};

constexpr int kMaxTerms = 16;

// The index of each name in dpo_kernels/loss_op/loss_types.py HYPER_PARAMS: each loss term's row of the op's
// `params` lists its hyper-parameters in this order (tests/loss_op/test_loss_types.py checks that the two agree,
// through hyper_param_name). Every term has every hyper-parameter; one that is not per loss type (beta, gamma, ...)
// repeats the call's one value in every row.
enum HyperParam : int {
  kBeta = 0,
  kLabelSmoothing,
  kLossWeights,
  kGamma,
  kTau,
  kDpopLambda,
  kNumHyperParams
};

// The name HYPER_PARAMS gives each enumerator, exposed by the extension (`dpo_kernels._C.hyper_param_names`) for
// the test that compares the orders; nullptr for an enumerator without a name (the switch has no default, so that
// -Wswitch flags it at build time too).
inline const char* hyper_param_name(HyperParam p) {
  switch (p) {
    case kBeta: return "beta";
    case kLabelSmoothing: return "label_smoothing";
    case kLossWeights: return "loss_weights";
    case kGamma: return "gamma";
    case kTau: return "tau";
    case kDpopLambda: return "dpop_lambda";
    case kNumHyperParams: break;
  }
  return nullptr;
}

template <typename T>
struct DpoLossArgs {
  int64_t batch;
  const T* policy_chosen;
  const T* policy_rejected;
  const T* ref_chosen;  // null: reference-free (0)
  const T* ref_rejected;
  const T* chosen_lengths;  // null unless a term needs them
  const T* rejected_lengths;
  int num_terms;
  int types[kMaxTerms];
  T params[kMaxTerms][kNumHyperParams];  // params[term][kGamma]: the term's gamma; beta is one for every term
  // Batch-coupled inputs, prepared by the host code (sorts and sums) before the launch; null when unused.
  const T* aot_sorted_policy;    // sort(pc - pr)
  const T* aot_sorted_ref;       // sort(rc - rr)
  const int64_t* aot_rank;       // rank[p]: sorted position of pair p's pc - pr
  const T* aotu_sorted_chosen;   // sort(pc - rc)
  const T* aotu_sorted_rejected; // sort(pr - rr)
  const int64_t* aotu_rank_chosen;
  const int64_t* aotu_rank_rejected;
  const T* sft_sums;             // [2]: sum(pc) (sum(pc * lc) from means), sum(lc)
  bool from_means;               // log-probs are per-token means: already length-normalized; d sft / d pc scales
                                 // with lc
  // Outputs.
  T* losses;
  T* chosen_rewards;
  T* rejected_rewards;
  T* grad_chosen;
  T* grad_rejected;
  T* loss;             // []
  T* reward_accuracy;  // []
  T* reward_margin;    // []
};

DPO_HD float dk_exp(float x) { return expf(x); }
DPO_HD double dk_exp(double x) { return exp(x); }
DPO_HD float dk_log1p(float x) { return log1pf(x); }
DPO_HD double dk_log1p(double x) { return log1p(x); }
DPO_HD float dk_log(float x) { return logf(x); }
DPO_HD double dk_log(double x) { return log(x); }
DPO_HD float dk_abs(float x) { return fabsf(x); }
DPO_HD double dk_abs(double x) { return fabs(x); }

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): never overflows; NaN stays NaN.
template <typename T>
DPO_HD T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - dk_log1p(dk_exp(-dk_abs(x)));
}

template <typename T>
DPO_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + dk_exp(-x));
  const T e = dk_exp(x);
  return e / (T(1) + e);
}

// relu that keeps NaN (torch.relu(NaN) is NaN).
template <typename T>
DPO_HD T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

template <typename T>
struct Term {
  T value;  // the loss
  T dz;     // its derivative w.r.t. its scalar argument
};

// -(1-eps) logsig(z) - eps logsig(-z); eps = 0 skips the second part so that saturated z cannot make 0 * inf.
// logsig(+-z) and sig(+-z) all derive from e = exp(-|z|) and log1p(e), by the very operations log_sigmoid and
// sigmoid perform (same bits), so one exp and one log1p serve the four: the CPU kernel at large B is bound by them.
template <typename T>
DPO_HD Term<T> smoothed_logistic(T z, T eps) {
  const T e = dk_exp(-dk_abs(z));
  const T log1p_e = dk_log1p(e);
  const T sig_minus_z = (z > T(0) ? e : T(1)) / (T(1) + e);  // NaN z: 1 / (1 + NaN)
  Term<T> t{-(T(1) - eps) * ((z < T(0) ? z : T(0)) - log1p_e), -(T(1) - eps) * sig_minus_z};
  if (eps != T(0)) {
    const T sig_z = (z >= T(0) ? T(1) : e) / (T(1) + e);
    t.value -= eps * ((-z < T(0) ? -z : T(0)) - log1p_e);
    t.dz += eps * sig_z;
  }
  return t;
}

template <typename T>
DPO_HD T clamp_len(const T* lengths, int64_t p) {
  const T l = lengths[p];
  return l < T(1) ? T(1) : l;
}

// The divisor of a length-normalized term (ipo, sigmoid_norm, simpo): the clamped length, or 1 when the log-probs
// are per-token means, which are length-normalized already.
template <typename T>
DPO_HD T norm_len(const DpoLossArgs<T>& a, const T* lengths, int64_t p) {
  return a.from_means ? T(1) : clamp_len(lengths, p);
}

// The lengths a length-normalized term (ipo, sigmoid_norm, simpo) divides by; the other terms never read them.
DPO_HD bool reads_norm_lengths(int type) { return type == kIpo || type == kSigmoidNorm || type == kSimpo; }

// One pair's values as a term reads them: the policy's and reference's log-probs of the preferred (c) and the other
// (r) response (reference 0 when reference-free), and the divisors of the length-normalized terms (norm_len, or 1
// where the term reads none).
template <typename T>
struct PairLogps {
  T pc, pr, rc, rr;
  T lc, lr;
};

// One loss term of one pair, for every loss type that reads that pair alone (all but aot, aot_unpaired and sft):
// its value (weight not applied) and d(value)/d(pc), d(value)/d(pr). `params` is the term's row of hyper-parameters,
// in enum HyperParam order. The group losses apply it to each pair of a group (group_loss_math.h).
template <typename T>
DPO_HD void pair_term(int type, const T* params, const PairLogps<T>& in, T& value, T& dc, T& dr) {
  const T beta = params[kBeta];
  const T eps = params[kLabelSmoothing];
  const T pc = in.pc, pr = in.pr, rc = in.rc, rr = in.rr;
  const T c = pc - rc, r = pr - rr;
  const T z = beta * (c - r);
  switch (type) {
    case kSigmoid: {
      const Term<T> t = smoothed_logistic(z, eps);
      value = t.value, dc = beta * t.dz, dr = -beta * t.dz;
      return;
    }
    case kHinge: {
      const T h = T(1) - z;
      value = relu(h);
      const T g = h > T(0) ? -beta : (h != h ? h : T(0));
      dc = g, dr = -g;
      return;
    }
    case kIpo:
    case kSigmoidNorm: {
      const T lc = in.lc, lr = in.lr;
      const T d = c / lc - r / lr;
      T dd;
      if (type == kIpo) {
        const T e = d - T(1) / (T(2) * beta);
        value = e * e, dd = T(2) * e;
      } else {
        value = -log_sigmoid(beta * d), dd = -beta * sigmoid(-beta * d);
      }
      dc = dd / lc, dr = -dd / lr;
      return;
    }
    case kExoPair: {
      const T log_pw = dk_log1p(-eps), log_pl = dk_log(eps);
      const T qw = sigmoid(z), ql = sigmoid(-z);
      value = qw * (log_sigmoid(z) - log_pw) + ql * (log_sigmoid(-z) - log_pl);
      // d/dz = sig(z) sig(-z) (logsig(z) - logsig(-z) - log_pw + log_pl), and logsig(z) - logsig(-z) = z.
      const T g = beta * qw * ql * (z - log_pw + log_pl);
      dc = g, dr = -g;
      return;
    }
    case kNcaPair: {
      const T bc = beta * c, br = beta * r;
      value = -log_sigmoid(bc) - T(0.5) * log_sigmoid(-bc) - T(0.5) * log_sigmoid(-br);
      dc = beta * (-sigmoid(-bc) + T(0.5) * sigmoid(bc));
      dr = beta * T(0.5) * sigmoid(br);
      return;
    }
    case kRobust: {
      const T norm = T(1) - T(2) * eps;
      value = (-(T(1) - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / norm;
      const T g = beta * (-(T(1) - eps) * sigmoid(-z) - eps * sigmoid(z)) / norm;
      dc = g, dr = -g;
      return;
    }
    case kBcoPair: {
      const T bc = beta * c, br = beta * r;
      value = -log_sigmoid(bc) - log_sigmoid(-br);
      dc = -beta * sigmoid(-bc), dr = beta * sigmoid(br);
      return;
    }
    case kSppoHard: {
      const T ec = c - T(0.5) / beta, er = r + T(0.5) / beta;
      value = ec * ec + er * er;
      dc = T(2) * ec, dr = T(2) * er;
      return;
    }
    case kApoZero: {
      const T sc = sigmoid(beta * c), sr = sigmoid(beta * r);
      value = T(1) - sc + sr;
      dc = -beta * sc * (T(1) - sc), dr = beta * sr * (T(1) - sr);
      return;
    }
    case kApoDown: {
      const T sc = sigmoid(beta * c), sz = sigmoid(z), szn = sigmoid(-z);
      value = sc + (T(1) - sz);
      dc = beta * sc * (T(1) - sc) - beta * sz * szn;
      dr = beta * sz * szn;
      return;
    }
    case kDiscopop: {
      const T tau = params[kTau];
      const T m = sigmoid(z / tau), mn = sigmoid(-z / tau);
      const T ls = log_sigmoid(z);
      // exp(-z) * m as exp(logsig(z/tau) - z): finite where exp(-z) alone overflows but m has underflowed.
      const T em = dk_exp(log_sigmoid(z / tau) - z);
      value = -ls * (T(1) - m) + em;
      const T dm = m * mn / tau;
      const T g = beta * (dm * ls + em * mn / tau - mn * sigmoid(-z) - em);
      dc = g, dr = -g;
      return;
    }
    case kSimpo: {
      const T lc = in.lc, lr = in.lr;
      const Term<T> t = smoothed_logistic(beta * (pc / lc - pr / lr) - params[kGamma], eps);
      value = t.value, dc = beta * t.dz / lc, dr = -beta * t.dz / lr;
      return;
    }
    case kDpop: {
      const T lambda = params[kDpopLambda];
      const T x = rc - pc;
      const T zp = beta * (c - r - lambda * relu(x));
      value = -log_sigmoid(zp);
      const T g = -sigmoid(-zp) * beta;
      // relu's derivative at 0 is taken as 0, as torch.relu's backward does.
      dc = g * (T(1) + (x > T(0) ? lambda : T(0))), dr = -g;
      return;
    }
    default:
      value = dc = dr = T(NAN);
  }
}

// One loss term of pair p: its value (weight not applied) and d(value)/d(pc), d(value)/d(pr) as this pair's entry
// of the per-pair vector whose mean is the loss. For the batch-coupled terms the gradient comes from the sorted
// position the pair landed on, and `dc`/`dr` already include the 1/B of the mean (flag `already_mean`).
template <typename T>
DPO_HD void loss_term(const DpoLossArgs<T>& a, int term, int64_t p, T& value, T& dc, T& dr, bool& already_mean) {
  const T beta = a.params[term][kBeta];
  const T eps = a.params[term][kLabelSmoothing];
  already_mean = false;
  switch (a.types[term]) {
    case kAot:
    case kAotUnpaired: {
      const bool paired = a.types[term] == kAot;
      const T* s1 = paired ? a.aot_sorted_policy : a.aotu_sorted_chosen;
      const T* s2 = paired ? a.aot_sorted_ref : a.aotu_sorted_rejected;
      value = smoothed_logistic(beta * (s1[p] - s2[p]), eps).value;
      // Gradient of the sorted position this pair's value landed on (sort's backward is a gather by rank).
      const T inv_b = T(1) / T(a.batch);
      const int64_t k1 = paired ? a.aot_rank[p] : a.aotu_rank_chosen[p];
      const T g1 = beta * smoothed_logistic(beta * (s1[k1] - s2[k1]), eps).dz * inv_b;
      if (paired) {
        dc = g1, dr = -g1;
      } else {
        const int64_t k2 = a.aotu_rank_rejected[p];
        dc = g1;
        dr = -beta * smoothed_logistic(beta * (s1[k2] - s2[k2]), eps).dz * inv_b;
      }
      already_mean = true;
      return;
    }
    case kSft: {
      const T total_len = a.sft_sums[1] < T(1) ? T(1) : a.sft_sums[1];
      value = -a.sft_sums[0] / total_len;
      dc = -(a.from_means ? a.chosen_lengths[p] : T(1)) / total_len, dr = T(0);
      already_mean = true;
      return;
    }
    default: {
      const int type = a.types[term];
      const bool normalized = reads_norm_lengths(type);
      const PairLogps<T> in{a.policy_chosen[p], a.policy_rejected[p], a.ref_chosen ? a.ref_chosen[p] : T(0),
                            a.ref_rejected ? a.ref_rejected[p] : T(0),
                            normalized ? norm_len(a, a.chosen_lengths, p) : T(1),
                            normalized ? norm_len(a, a.rejected_lengths, p) : T(1)};
      pair_term(type, a.params[term], in, value, dc, dr);
    }
  }
}

// Pair p: writes losses[p], rewards and grads; returns the pair's loss (its share of the mean, times B) and whether
// chosen_rewards > rejected_rewards through `correct`.
template <typename T>
DPO_HD T dpo_pair(const DpoLossArgs<T>& a, int64_t p, bool& correct, T& margin) {
  const T inv_b = T(1) / T(a.batch);
  T total = T(0), gc = T(0), gr = T(0);
  for (int term = 0; term < a.num_terms; ++term) {
    T value, dc, dr;
    bool already_mean;
    loss_term(a, term, p, value, dc, dr, already_mean);
    const T w = a.params[term][kLossWeights];
    const T scale = already_mean ? w : w * inv_b;
    total += w * value;
    gc += scale * dc;
    gr += scale * dr;
  }
  const T rc = a.ref_chosen ? a.ref_chosen[p] : T(0);
  const T rr = a.ref_rejected ? a.ref_rejected[p] : T(0);
  const T beta = a.params[0][kBeta];
  const T chosen_reward = beta * (a.policy_chosen[p] - rc);
  const T rejected_reward = beta * (a.policy_rejected[p] - rr);
  a.losses[p] = total;
  a.chosen_rewards[p] = chosen_reward;
  a.rejected_rewards[p] = rejected_reward;
  a.grad_chosen[p] = gc;
  a.grad_rejected[p] = gr;
  correct = chosen_reward > rejected_reward;
  margin = chosen_reward - rejected_reward;
  return total;
}

}  // namespace dpo_kernels
