"""The accuracy rule of DESIGN.md section 5, shared by every test.

A kernel's result `out` is judged against the float64 truth `truth`: its max abs error may be at most
`factor` (2) times the error of plain PyTorch in the same dtype (`baseline`), plus `atol`. NaN never passes.
"""
import torch


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(out, truth, baseline, *, atol: float, factor: float = 2.0, name: str = "output"):
    out, truth, baseline = out.detach(), truth.detach(), baseline.detach()
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(truth.shape)}"
    finite = torch.isfinite(truth)
    # Non-finite truth must be matched exactly (inf by the same inf, NaN by NaN); a finite truth by a finite value.
    same_nonfinite = (out.double() == truth.double()) | (torch.isnan(out) & torch.isnan(truth))
    bad = (~finite & ~same_nonfinite) | (finite & ~torch.isfinite(out))
    assert not bad.any(), (
        f"{name}: non-finite mismatch at {bad.nonzero()[:3].tolist()}: "
        f"got {out[bad][:3].tolist()}, expected {truth[bad][:3].tolist()}"
    )
    if out.numel() == 0:
        return
    keep = finite
    o, t, b = out.double()[keep], truth.double()[keep], baseline.double()[keep]
    err = (o - t).abs()
    allowed = factor * max_abs_error(b, t) + atol
    if err.numel() and err.max().item() > allowed:
        worst = err.argmax().item()
        where = keep.nonzero()[worst].tolist()
        raise AssertionError(
            f"{name}: max abs error {err.max().item():.3e} > allowed {allowed:.3e} "
            f"(baseline error {max_abs_error(b, t):.3e}, atol {atol:.1e}) at index {where}: "
            f"got {o[worst].item():.8g}, expected {t[worst].item():.8g}"
        )
