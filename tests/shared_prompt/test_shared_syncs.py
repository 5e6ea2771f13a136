"""What a shared-prompt step costs beside its arithmetic: the log-prob functions wait on the device for nothing, the
packed HF path reads its offsets once, and the dense attention mask is built once per forward, in the dtype that
reaches SDPA, so that no layer converts it again."""
import pytest
import torch

from dpo_kernels import hf, validation
from dpo_kernels.integrations.packing import pack_rows
from dpo_kernels.shared_prompt import (
    SharedPromptBatch,
    build_shared_batch,
    gather_scored_logits,
    sequence_logprobs_from_logits,
    shared_logits,
)
from tests.helpers import OpLog
from tests.shared_prompt.test_shared_models import COMMON, PAIRS, VOCAB, build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_sync_counter_sees_an_item():
    with OpLog() as log:
        torch.arange(3).max().item()
    assert log.count("_local_scalar_dense") == 1


def test_log_prob_functions_make_one_host_sync_at_most():
    batch = build_shared_batch(PAIRS, pack=True)
    logits = torch.randn(*batch.input_ids.shape, VOCAB, requires_grad=True)
    with OpLog() as from_logits:
        logps = sequence_logprobs_from_logits(logits, batch, average=True)
        logps.sum().backward()
    with OpLog() as gather:
        gathered, labels = gather_scored_logits(logits, batch)
    # The one left is the log-prob op's label range check, which keeps a bad label from reaching a kernel.
    assert from_logits.count("_local_scalar_dense") == 1
    assert gather.count("_local_scalar_dense") == 0
    counts = batch.counts.tolist()
    assert batch.max_count == max(counts) and gathered.shape[1] == labels.shape[1] == max(counts) + 1


def test_max_count_travels_with_the_batch():
    batch = build_shared_batch(PAIRS)
    moved = batch.to("cpu")
    assert isinstance(moved, SharedPromptBatch) and moved.max_count == batch.max_count


def test_the_packed_path_reads_its_offsets_once(monkeypatch):
    reads = []
    facts = validation._offsets_facts
    monkeypatch.setattr(validation, "_offsets_facts", lambda cu: reads.append(cu) or facts(cu))
    model = build_model("llama", "sdpa")
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    packed = pack_rows(ids, (ids != 0).long(), ids)
    with torch.no_grad():  # no position_ids given: they come from the offsets, which must be valid first
        hf.sequence_logprobs(model, packed.input_ids, None, packed.labels, cu_seqlens=packed.cu_seqlens)
    assert len(reads) == 1


def test_offsets_changed_in_place_are_read_again():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    validation.check_cu_seqlens(cu, 5)
    cu[1] = 6
    with pytest.raises(ValueError, match="non-decreasing"):
        validation.check_cu_seqlens(cu, 5)
    with pytest.raises(ValueError, match="end at"):
        validation.check_cu_seqlens(torch.tensor([0, 2, 5]), 4)


def _square_masks(log, batch):
    """The ops of `log` that return a new (not in-place) floating `[rows, 1, T, T]` tensor: dense masks."""
    rows, T = batch.input_ids.shape
    return [call.op for call in log.calls if not call.name.endswith("_")
            and any(shape == (rows, 1, T, T) and dtype.is_floating_point for shape, dtype in call.outputs)]


@pytest.mark.parametrize("arch, masks", [("llama", 1), ("qwen2", 2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_sdpa_mask_is_built_once_per_forward(monkeypatch, arch, masks, autocast):
    """One dense mask per forward (two for a model mixing full and sliding layers), whatever the number of layers:
    a bool mask, or a float one in another dtype than the query's, would be converted again by every layer."""
    built = []
    rule = SharedPromptBatch.attention_mask
    monkeypatch.setattr(SharedPromptBatch, "attention_mask", lambda self, w=None: built.append(w) or rule(self, w))
    monkeypatch.setitem(COMMON, "num_hidden_layers", 3)  # more layers than masks
    model = build_model(arch, "sdpa")
    batch = build_shared_batch(PAIRS, pack=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpLog() as log:
        shared_logits(model, batch)
    assert len(built) == masks
    assert len(_square_masks(log, batch)) == masks, _square_masks(log, batch)
