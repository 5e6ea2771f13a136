"""DPO losses to drop into a training loop: from logits (`DPOLoss`) or from hidden states (`FusedLinearDPOLoss`).

Both take a batch of 2B sequences, the B chosen responses first (pair i is rows i and B+i), labels with
`ignore_index` on prompt and padding positions, and return a `DPOOutput` whose `loss` is the only differentiable
field. Sequence log-probs are label log-prob sums (means with `average=True`); the response lengths handed to
length-normalized losses are the numbers of scored tokens.
"""
from torch import nn

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import fused_linear_dpo
from dpo_kernels.fused_linear.parallel import options_of
from dpo_kernels.fused_linear.plan import scored_counts
from dpo_kernels.logprobs.from_logits import sequence_logprobs
from dpo_kernels.loss_op.op import dpo_loss
from dpo_kernels.loss_op.spec import check_average, check_loss_settings, check_reference_logps, op_constants
from dpo_kernels.outputs import DPOOutput
from dpo_kernels.validation import check_ndim

__all__ = ["DPOLoss", "DPOOutput", "FusedLinearDPOLoss"]


class DPOLoss(nn.Module):
    """DPO from logits: `sequence_logprobs` (one Triton read of the logits) then the fused `dpo_loss` op.

    `forward(logits [2B, T, V], labels [2B, T], ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput`;
    logits in float32/bfloat16/float16, reference log-probs `[B]` (None for reference-free losses).
    `loss_params` are the loss's hyper-parameters (`gamma`, `tau`, `dpop_lambda`, `loss_weights`), as `dpo_loss`.
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX,
                 shift=True, **loss_params):
        super().__init__()
        check_loss_settings(loss_type, beta=beta, label_smoothing=label_smoothing, loss_params=loss_params)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average, self.ignore_index, self.shift, self.loss_params = average, ignore_index, shift, loss_params

    def forward(self, logits, labels, ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput:
        # Only what the pair split needs: sequence_logprobs validates logits and labels in full, and a second
        # label-range check here would cost a second device sync per step on CUDA.
        check_ndim(logits, 3, "logits", "[R, T, V]")
        if logits.shape[0] == 0 or logits.shape[0] % 2:
            raise ValueError(f"the batch needs an even, non-zero number of rows (B chosen then B rejected), got "
                             f"{logits.shape[0]}")
        B = logits.shape[0] // 2
        # Settings and references before the pass over the logits (the settings' check is cached, and the attributes
        # may have changed since __init__ checked them).
        op_constants(self.loss_type, self.beta, self.label_smoothing, True, True, self.loss_params)
        check_average(self.average)
        check_reference_logps(ref_chosen_logps, ref_rejected_logps, B, logits.device, "logits")
        logps = sequence_logprobs(logits, labels, ignore_index=self.ignore_index, shift=self.shift,
                                  average=self.average)
        counts = scored_counts(labels, self.ignore_index, self.shift)
        out = dpo_loss(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps, beta=self.beta,
                       loss_type=self.loss_type, label_smoothing=self.label_smoothing, chosen_lengths=counts[:B],
                       rejected_lengths=counts[B:], average=self.average, **self.loss_params)
        ref_c = None if ref_chosen_logps is None else ref_chosen_logps.detach()
        ref_r = None if ref_rejected_logps is None else ref_rejected_logps.detach()
        return DPOOutput(out.loss, logps[:B].detach(), logps[B:].detach(), out.chosen_rewards.detach(),
                         out.rejected_rewards.detach(), out.reward_accuracy.detach(), out.reward_margin.detach(),
                         out.losses.detach(), ref_c, ref_r, counts[:B], counts[B:])


class FusedLinearDPOLoss(nn.Module):
    """DPO from the policy's last hidden states and lm_head, never materializing the `[2B, T, V]` logits.

    `forward(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None, ref_rejected_logps=None,
    ref_hidden=None, ref_weight=None, ref_bias=None) -> DPOOutput`, shapes as `fused_linear_dpo`:
    hidden `[2B, T, H]` (or packed `[N, H]` with `cu_seqlens [2B + 1]`), weight `[V, H]`, labels `[2B, T]`
    (or `[N]`). The gradients w.r.t. hidden, weight and bias are formed during the forward (6NHV FLOPs) and
    only scaled in the backward, so call `backward` once per forward.

    memory_budget: None (a 2 GiB `[C, V]` logits buffer, C <= 8192 tokens), bytes for that buffer, or "low"
    (a 512 MiB buffer and recompute in the backward: least memory, 8NHV).
    token_stats: also return the policy's per-sequence entropy sums and top-1 counts (`DPOOutput` fields
    `chosen_entropy_sum` ... `rejected_top1_count`), taken from the pass that reads the logits anyway.
    parallel_options: a `ParallelOptions`, the process groups over which the head's vocabulary rows or the sequences'
    positions are split and the ranks' consistency check (see `fused_linear_dpo`); `vocab_parallel_group=` and
    `sequence_parallel_group=` are shorthands that build one. A DTensor weight sharded on dim 0 needs no group.
    `forward(..., lora=LoraHead(a, b, scaling))`: a LoRA adapter on the head (a PEFT LoRA lm_head), run inside the
    engine; `a` and `b` get their gradients (see `fused_linear_dpo`).
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX,
                 memory_budget=None, shift=True, token_stats=False, parallel_options=None, vocab_parallel_group=None,
                 sequence_parallel_group=None, **loss_params):
        super().__init__()
        self.parallel_options = options_of(parallel_options, vocab_parallel_group, sequence_parallel_group)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average, self.ignore_index, self.memory_budget = average, ignore_index, memory_budget
        self.shift, self.token_stats, self.loss_params = shift, token_stats, loss_params

    def forward(self, hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, lora=None) -> DPOOutput:
        return fused_linear_dpo(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens,
                                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, beta=self.beta,
                                loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                average=self.average, ignore_index=self.ignore_index, shift=self.shift,
                                memory_budget=self.memory_budget, token_stats=self.token_stats,
                                parallel_options=self.parallel_options, lora=lora, **self.loss_params)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, average={self.average}, "
                f"memory_budget={self.memory_budget!r}, token_stats={self.token_stats}")
