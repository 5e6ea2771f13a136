"""hf.sequence_logprobs on a packed batch: without `position_ids` it derives them from `cu_seqlens`, so attention
stays within each sequence and the result equals the unpacked one."""
import pytest
import torch

from dpo_kernels import hf
from dpo_kernels.integrations.packing import pack_rows
from tests.tiny_models import build_llama

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 61


def _batch(rows=3, length=9):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, length - 2 * r:] = 0  # rows of 9, 7 and 5 tokens
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return ids, mask, labels


def test_packed_without_position_ids_matches_unpacked():
    model = build_llama(VOCAB)
    ids, mask, labels = _batch()
    unpacked = hf.sequence_logprobs(model, ids, mask, labels, reference=True)
    packed = pack_rows(ids, mask, labels)
    got = hf.sequence_logprobs(model, packed.input_ids, None, packed.labels, cu_seqlens=packed.cu_seqlens,
                               reference=True)
    torch.testing.assert_close(got, unpacked, rtol=1e-5, atol=1e-5)


def test_packed_position_ids_restart_per_sequence():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert hf.packed_position_ids(cu, 7).tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    for bad, message in ((torch.tensor([0, 5, 3]), "non-decreasing"), (torch.tensor([1, 7]), "start at 0"),
                         (torch.tensor([0, 6]), "end at"), (torch.tensor([0.0, 7.0]), "integer")):
        with pytest.raises(ValueError, match=message):
            hf.packed_position_ids(bad, 7)
