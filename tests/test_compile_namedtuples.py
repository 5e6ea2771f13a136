"""NamedTuples that a compiled model's forward builds keep every field: the token sums the TRL drop-in's head
function returns (`with_engine_stats`) and the LoRA head the forward hands the fused head (`lora_operands`), on a
NamedTuple that enters the compiled frame as an input and across a graph break."""
import pytest
import torch

from dpo_kernels.fused_linear.functional import lora_operands
from dpo_kernels.fused_linear.lora import LoraHead
from dpo_kernels.integrations.token_metrics import TokenSums, with_engine_stats
from dpo_kernels.outputs import DPOOutput

pytestmark = pytest.mark.usefixtures("single_thread")

B = 3


def _assert_same_fields(got, want):
    assert type(got) is type(want)
    fields = tuple.__len__(got)  # len() would read the fields, which an empty instance lacks
    assert fields == len(want._fields), f"{fields} fields, {type(want).__name__} has {len(want._fields)}"
    for name in want._fields:
        g, w = getattr(got, name), getattr(want, name)
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and torch.equal(g, w), f"{name}: {g} != {w}"
        else:
            assert g == w, f"{name}: {g!r} != {w!r}"


def test_engine_stats_keep_the_token_sums_fields():
    counts = torch.tensor([7.0, 5.0])
    sums = TokenSums(counts[0], counts[1], torch.tensor(1.5), torch.tensor(-0.25), None, None)
    vectors = [torch.randn(B) for _ in range(12)]
    out = DPOOutput(*vectors, chosen_entropy_sum=torch.rand(B), rejected_entropy_sum=torch.rand(B),
                    chosen_top1_count=torch.randint(0, 4, (B,)), rejected_top1_count=torch.randint(0, 4, (B,)))
    torch._dynamo.reset()
    compiled = torch.compile(with_engine_stats, fullgraph=True, backend="aot_eager")
    _assert_same_fields(compiled(sums, out), with_engine_stats(sums, out))


def test_lora_operands_keep_the_adapter_across_a_graph_break():
    def head_operands_then_break(lora):
        lora = lora_operands(lora)
        torch._dynamo.graph_break()  # the model's forward breaks inside the head function (token_sums' masks)
        return lora

    lora = LoraHead(torch.randn(2, 5), torch.randn(7, 2), 0.75)
    torch._dynamo.reset()
    compiled = torch.compile(head_operands_then_break, backend="aot_eager")
    _assert_same_fields(compiled(lora), head_operands_then_break(lora))
