"""dpo_kernels.trainer.ref_logps: the reference log-prob cache is keyed by model, data and settings, written
atomically, and a damaged cache file is recomputed with a warning rather than failing the run."""
from functools import partial

import pytest
import torch

from dpo_kernels.trainer import ref_logps, train
from tests.tiny_models import train_config

config = partial(train_config, max_steps=1)


def test_a_truncated_cache_file_is_recomputed_with_a_warning(tiny, tmp_path):
    cache = tmp_path / "cache"
    first = train(config(tiny, tmp_path / "a", precompute_ref=True, ref_cache_dir=str(cache)))
    (path,) = cache.glob("*.safetensors")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.warns(UserWarning, match=rf"{path.name}: unreadable reference log-prob cache .*; recomputing it"):
        second = train(config(tiny, tmp_path / "b", precompute_ref=True, ref_cache_dir=str(cache)))
    assert second.history[0]["loss"] == first.history[0]["loss"]
    assert path.read_bytes() == whole


def test_the_cache_round_trips_and_refuses_another_size(tmp_path):
    path = ref_logps.cache_path(tmp_path, "k")
    chosen, rejected = torch.tensor([-1.5, -2.0, -3.25]), torch.tensor([-4.0, -0.5, -1.0])
    ref_logps.save_cached(path, chosen, rejected)
    got = ref_logps.load_cached(path, 3)
    assert torch.equal(got[0], chosen) and torch.equal(got[1], rejected)
    assert ref_logps.load_cached(path, 4) is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_the_key_changes_with_model_data_and_settings(tiny, tmp_path):
    key = ref_logps.cache_key(tiny["model"], "fingerprint", {"dtype": "float32"})
    assert key == ref_logps.cache_key(tiny["model"], "fingerprint", {"dtype": "float32"})
    assert key != ref_logps.cache_key(tiny["model"], "other data", {"dtype": "float32"})
    assert key != ref_logps.cache_key(tiny["model"], "fingerprint", {"dtype": "bfloat16"})
    assert key != ref_logps.cache_key(str(tmp_path), "fingerprint", {"dtype": "float32"})
