"""Property test: random small shapes, masks and options agree with the float64 reference on both backends."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import BACKENDS, IGNORE_INDEX, LOGPROBS_ATOL, check_against_reference, device_for


@st.composite
def cases(draw):
    R, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    V = draw(st.sampled_from([1, 2, 7, 100, 257, 1000]))
    dtype, atol = draw(st.sampled_from(LOGPROBS_ATOL))
    seed = draw(st.integers(0, 2**31 - 1))
    keep = draw(st.floats(0.0, 1.0))
    gen, cpu = torch.Generator().manual_seed(seed), "cpu"
    logits = (torch.randn(R, T, V, generator=gen, device=cpu) * draw(st.sampled_from([0.5, 4.0]))).to(dtype)
    labels = torch.randint(0, V, (R, T), generator=gen, device=cpu)
    labels[torch.rand(R, T, generator=gen, device=cpu) >= keep] = IGNORE_INDEX
    options = {"shift": draw(st.booleans())}
    name = draw(st.sampled_from(["sequence_logprobs", "token_logprobs"]))
    if name == "sequence_logprobs":
        options["average"] = draw(st.booleans())
        upstream = torch.randn(R, generator=gen, device=cpu)
    else:
        upstream = torch.randn(R, T - 1 if options["shift"] else T, generator=gen, device=cpu)
    return name, logits, labels, upstream, atol, options


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases_match_reference(force_backend, backend, case):
    force_backend(backend)
    name, logits, labels, upstream, atol, options = case
    device = device_for(backend)
    logits, labels, upstream = logits.to(device), labels.to(device), upstream.to(device)
    check_against_reference(name, logits, labels, upstream, atol, **options)
