"""Sequence and token log-probabilities of labels from logits (PyTorch fallback; Triton kernels follow)."""
import torch

from dpo_kernels.ops._validation import check_logits_labels

_CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, cols: int, vocab: int):
    per_chunk = max(1, _CHUNK_ELEMENTS // vocab)
    if cols >= per_chunk:
        for r in range(rows):
            for c0 in range(0, cols, per_chunk):
                yield slice(r, r + 1), slice(c0, min(cols, c0 + per_chunk))
    else:
        rows_per_chunk = max(1, per_chunk // max(cols, 1))
        for r0 in range(0, rows, rows_per_chunk):
            yield slice(r0, min(rows, r0 + rows_per_chunk)), slice(0, cols)


def _forward_torch(logits, labels, ignore_index, shift):
    R, T, V = logits.shape
    Tp = T - 1 if shift else T
    lse = torch.zeros(R, max(Tp, 0), dtype=torch.float32, device=logits.device)
    tok = torch.zeros_like(lse)
    scored = labels[:, 1:] if shift else labels
    for rs, ts in _chunks(R, max(Tp, 0), V):
        x = logits[rs, ts].float()
        lab = scored[rs, ts]
        valid = lab != ignore_index
        chunk_lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(-1, lab.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
        lse[rs, ts] = chunk_lse
        tok[rs, ts] = (picked - chunk_lse).masked_fill(~valid, 0.0)
    return tok, lse


def _backward_torch(logits, labels, lse, grad, ignore_index, shift, inplace):
    R, T, V = logits.shape
    Tp = T - 1 if shift else T
    out = logits.detach() if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if shift and T > 0:
        out[:, T - 1].zero_()
    scored = labels[:, 1:] if shift else labels
    for rs, ts in _chunks(R, max(Tp, 0), V):
        lab = scored[rs, ts]
        valid = lab != ignore_index
        g = grad[rs, ts].float().masked_fill(~valid, 0.0)
        d = torch.exp(logits[rs, ts].float() - lse[rs, ts].unsqueeze(-1)).mul_(-g.unsqueeze(-1))
        d.scatter_add_(-1, lab.masked_fill(~valid, 0).unsqueeze(-1), g.unsqueeze(-1))
        d.masked_fill_(~valid.unsqueeze(-1), 0.0)
        out[rs, ts] = d.to(out.dtype)
    return out


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, shift, inplace_backward):
        tok, lse = _forward_torch(logits, labels, ignore_index, shift)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (ignore_index, shift, inplace_backward)
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, shift, inplace = ctx.args
        dlogits = _backward_torch(logits, labels, lse, grad_tok, ignore_index, shift, inplace)
        return dlogits, None, None, None, None


def token_logprobs(logits, labels, *, ignore_index=-100, shift=True, inplace_backward=False):
    check_logits_labels(logits, labels, ignore_index)
    return TokenLogprobsFunction.apply(logits, labels, ignore_index, bool(shift), bool(inplace_backward))


def sequence_logprobs(logits, labels, *, ignore_index=-100, shift=True, average=False, inplace_backward=False):
    tok = token_logprobs(logits, labels, ignore_index=ignore_index, shift=shift, inplace_backward=inplace_backward)
    total = tok.sum(-1)
    if not average:
        return total
    scored = labels[:, 1:] if shift else labels
    count = (scored != ignore_index).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1).to(total.dtype), torch.zeros_like(total))
