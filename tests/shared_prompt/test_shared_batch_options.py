"""`build_shared_batch` and `truncate_pair` refuse integer options that would silently change what is scored."""
import pytest

from dpo_kernels.shared_prompt import build_shared_batch

PAIRS = [([5, 6, 7], [8, 9], [10])]


@pytest.mark.parametrize("options, message", [
    (dict(max_prompt_length=0), "max_prompt_length must be an integer >= 1 or None, got 0"),
    (dict(max_prompt_length=-2), "max_prompt_length must be an integer >= 1 or None, got -2"),
    (dict(max_length=0), "max_length must be an integer >= 1 or None, got 0"),
    (dict(max_length=2.5), "max_length must be an integer >= 1 or None, got 2.5"),
    (dict(pad_id=-1), "pad_id must be an integer >= 0, got -1"),
    (dict(pad_id=True), "pad_id must be an integer >= 0, got True"),
    (dict(pad_to_multiple_of=2.5), "pad_to_multiple_of must be an integer >= 1, got 2.5"),
    (dict(pad_to_multiple_of=0), "pad_to_multiple_of must be an integer >= 1, got 0"),
    (dict(pack=True, max_row_tokens=0), "max_row_tokens must be an integer >= 1 or None, got 0"),
    (dict(bos_token_id=-3), "bos_token_id must be an integer >= 0 or None, got -3"),
])
def test_bad_integer_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_shared_batch(PAIRS, **options)


def test_a_one_token_prompt_still_scores_the_first_response_token():
    batch = build_shared_batch(PAIRS, max_prompt_length=1)
    # The prompt keeps its last token, which scores both responses' first tokens: every response token is scored.
    assert batch.input_ids[0, :4].tolist() == [7, 8, 9, 10]
    assert batch.counts.tolist() == [2, 1]
    assert batch.token_rows.tolist() == [0, 1, 0]
