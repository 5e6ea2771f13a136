"""The fused linear engine on the shared-prompt layout (`fused_linear_dpo(hidden, weight, batch.attribution)`):
loss, metrics and every gradient equal the unshared rows' within the accuracy rule, in every mode.

Oracle: the shared hidden states copied into the unshared `[2B, T, H]` layout, the float64 eager DPO on those
(`tests.helpers.eager_dpo`), and the unshared hidden-state gradient summed back onto the shared rows (the prompt's
rows are used by both responses' rows)."""
import pytest
import torch

import dpo_kernels
from dpo_kernels import LOSS_TYPES
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.plan import TokenAttribution
from dpo_kernels.shared_prompt import build_shared_batch, sequence_logprobs_from_hidden
from tests.helpers import LOSS_PARAMS, MODES, REFERENCE_FREE, check_against_truth, eager_dpo

pytestmark = pytest.mark.usefixtures("single_thread")

V, H = 300, 24
# One-token prompt, empty chosen, identical responses, a long pair (streams in the small-chunk modes).
PAIRS = [
    ([1, 5, 6, 7], [8, 9], [10, 11, 12]),
    ([4], [], [13]),
    ([1, 14, 15], [16, 17, 18], [16, 17, 18]),
    ([1, 22, 23, 24, 25, 26, 27], [28, 29, 30, 31, 32, 33, 34], [35, 36, 37, 38, 39]),
]


def unshared_index(batch, pairs):
    """`[2B, T]` the flat shared row behind each unshared position (-1 in padding), and the unshared labels."""
    B = len(pairs)
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    index = torch.full((2 * B, T), -1, dtype=torch.long)
    labels = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    width = batch.input_ids.shape[1]
    for i, (p, c, r) in enumerate(pairs):
        row, start = (batch.document_ids == i).nonzero()[0].tolist()
        base = row * width + start
        prompt = [base + t for t in range(len(p))]
        index[i, : len(p) + len(c)] = torch.tensor(prompt + [base + len(p) + t for t in range(len(c))])
        index[B + i, : len(p) + len(r)] = torch.tensor(prompt + [base + len(p) + len(c) + t for t in range(len(r))])
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        labels[B + i, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    return index, labels


def shared_case(dtype=torch.float32, pack=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = build_shared_batch(PAIRS, pack=pack)
    rows, T = batch.input_ids.shape
    hidden = torch.randn(rows, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    ref = torch.randn(2 * len(PAIRS), generator=g) * 3 - 20
    return batch, hidden, weight, bias, ref


def oracle(batch, hidden, weight, bias, ref_c, ref_r, *, loss_type, average, dtype=None, **params):
    """eager_dpo on the unshared copy; the hidden-state gradient summed back onto the shared rows."""
    index, labels = unshared_index(batch, PAIRS)
    flat = hidden.reshape(-1, H)
    unshared = flat[index.clamp_min(0)]
    out, logps, grads = eager_dpo(unshared, weight, bias, labels, ref_c, ref_r, loss_type=loss_type,
                                  average=average, dtype=dtype, **params)
    valid = index >= 0
    grad_h = torch.zeros(flat.shape, dtype=grads[0].dtype).index_add_(0, index[valid], grads[0][valid])
    return out, logps, (grad_h.view(hidden.shape), *grads[1:])


def run_shared(batch, hidden, weight, bias, ref_c, ref_r, **kwargs):
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    out = dpo_kernels.fused_linear_dpo(h, w, batch.attribution, bias=b, ref_chosen_logps=ref_c,
                                       ref_rejected_logps=ref_r, **kwargs)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_and_mode_fp32(loss_type, mode, average):
    batch, hidden, weight, bias, ref = shared_case(pack=mode == "pairs")
    B = len(PAIRS)
    ref_c, ref_r = (None, None) if loss_type in REFERENCE_FREE else (ref[:B], ref[B:])
    params = {"loss_type": loss_type, "average": average, **LOSS_PARAMS.get(loss_type, {})}
    truth = oracle(batch, hidden, weight, bias, ref_c, ref_r, dtype=torch.float64, **params)
    base = oracle(batch, hidden, weight, bias, ref_c, ref_r, **params)
    budget = MODES[mode](4, V, torch.float32)
    out, grads = run_shared(batch, hidden, weight, bias, ref_c, ref_r, memory_budget=budget, **params)
    check_against_truth(out, grads, truth, base, torch.float32)


@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
def test_bf16(mode):
    batch, hidden, weight, bias, ref = shared_case(torch.bfloat16, seed=3)
    B = len(PAIRS)
    params = {"loss_type": "sigmoid", "average": False}
    truth = oracle(batch, hidden, weight, bias, ref[:B], ref[B:], dtype=torch.float64, **params)
    base = oracle(batch, hidden, weight, bias, ref[:B], ref[B:], **params)
    out, grads = run_shared(batch, hidden, weight, bias, ref[:B], ref[B:],
                            memory_budget=MODES[mode](4, V, torch.bfloat16), **params)
    check_against_truth(out, grads, truth, base, torch.bfloat16)


def test_reference_hidden_states_share_the_layout():
    batch, hidden, weight, bias, _ = shared_case()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    out = dpo_kernels.fused_linear_dpo(hidden, weight, batch.attribution, bias=bias, ref_hidden=ref_hidden)
    expected = sequence_logprobs_from_hidden(ref_hidden, weight, batch, bias=bias)
    B = len(PAIRS)
    assert torch.equal(out.ref_chosen_logps, expected[:B]) and torch.equal(out.ref_rejected_logps, expected[B:])


def test_linear_sequence_logprobs_gradient_adds_on_the_shared_row():
    """The last prompt row scores two labels: its gradient is the sum of both tokens' (an index_copy would keep
    one of them)."""
    batch, hidden, weight, bias, _ = shared_case()
    h = hidden.detach().clone().requires_grad_()
    logps = sequence_logprobs_from_hidden(h, weight, batch, bias=bias)
    (logps * torch.arange(1.0, logps.numel() + 1)).sum().backward()
    h64 = hidden.double().requires_grad_()
    logits = torch.nn.functional.linear(h64.reshape(-1, H), weight.double(), bias.double())
    tok = torch.log_softmax(logits, -1)[batch.token_rows, batch.token_targets]
    truth = torch.zeros(logps.numel(), dtype=torch.float64).index_add(0, batch.token_seqs, tok)
    (truth * torch.arange(1.0, logps.numel() + 1, dtype=torch.float64)).sum().backward()
    assert torch.allclose(logps.double(), truth.detach(), atol=1e-4)
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-5)


def test_bad_attribution_is_refused():
    batch, hidden, weight, bias, _ = shared_case()
    rows, targets, seqs, n = batch.attribution
    with pytest.raises(ValueError, match="attribution.rows must lie in"):
        dpo_kernels.fused_linear_dpo(hidden, weight, TokenAttribution(rows + hidden.shape[0] * hidden.shape[1],
                                                                      targets, seqs, n))
    with pytest.raises(ValueError, match="attribution.seqs must lie in"):
        dpo_kernels.fused_linear_dpo(hidden, weight, TokenAttribution(rows, targets, seqs + n, n))
    with pytest.raises(ValueError, match="ignore_index"):
        dpo_kernels.fused_linear_dpo(hidden, weight, TokenAttribution(rows, torch.full_like(targets, IGNORE_INDEX),
                                                                      seqs, n))
    with pytest.raises(ValueError, match="one length"):
        dpo_kernels.fused_linear_dpo(hidden, weight, TokenAttribution(rows[1:], targets, seqs, n))
    with pytest.raises(ValueError, match="cu_seqlens does not apply"):
        dpo_kernels.fused_linear_dpo(hidden.reshape(-1, H), weight, batch.attribution,
                                     cu_seqlens=torch.tensor([0, hidden.numel() // H]))
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        dpo_kernels.fused_linear_dpo(hidden, weight, TokenAttribution(rows, targets + V, seqs, n))
