"""TrainConfig's field metadata: every setting's type, choices and range are checked from it, naming the setting
(and the file it came from); the choice lists are their owners'; the loss keywords follow the loss table."""
import dataclasses
import re
import types
import typing

import pytest
import torch

from dpo_kernels.loss_op.loss_types import HYPER_PARAMS
from dpo_kernels.trainer import TrainConfig, backends, distributed
from dpo_kernels.trainer import config as cfg
from dpo_kernels.trainer.errors import UserInputError

VALID = TrainConfig(model="m", data="d.jsonl")

# A value of the wrong type for each kind of annotation, and the phrase the message uses for the right one.
WRONG_TYPE = {bool: ("yes", "true or false"), int: ("1", "an integer"), float: ("1e-3", "a number"),
              str: (5, "text"), list: (1.0, "a list of numbers"), dict: ("gamma=1", "a mapping of keyword to number")}


def bad(**changes):
    return dataclasses.replace(VALID, **changes)


def kinds(name):
    """The classes a field's annotation allows besides None (`list[float] | None` -> [list])."""
    hint = cfg.field_types()[name]
    args = typing.get_args(hint) if typing.get_origin(hint) is types.UnionType else (hint,)
    return [typing.get_origin(a) or a for a in args if a is not type(None)]


def test_every_field_has_help_and_a_type_check():
    cfg.check_config(VALID)
    for name, f in cfg.FIELDS.items():
        assert f.metadata["help"], name
        first = kinds(name)[0]
        value, phrase = WRONG_TYPE[first]
        if str in kinds(name) and isinstance(value, str):  # int | str takes any text
            continue
        with pytest.raises(UserInputError, match=f"^{name} must be {phrase}"):
            cfg.check_config(bad(**{name: value}))


def test_choices_are_their_owners_lists():
    assert cfg.FIELDS["loss_backend"].metadata["choices"] is backends.BACKENDS
    assert cfg.FIELDS["distributed"].metadata["choices"] is distributed.MODES
    assert cfg.FIELDS["precision"].metadata["choices"] is cfg.PRECISIONS
    assert cfg.FIELDS["model_dtype"].metadata["choices"] == tuple(cfg.MODEL_DTYPES)
    with pytest.raises(UserInputError, match="loss_backend must be one of fused-linear, logits, reference"):
        cfg.check_config(bad(loss_backend="cuda-magic"))


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(max_steps=0), "max_steps must be >= 1, or -1"),
    (dict(max_steps=1.5), "max_steps must be an integer, got 1.5"),
    (dict(save_every="1"), "save_every must be an integer, got '1'"),
    (dict(lr=float("nan")), "lr must be > 0 and finite"),
    (dict(adam_eps=0.0), "adam_eps must be > 0"),
    (dict(adam_beta1=1.5), "adam_beta1 must be in [0, 1)"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(warmup_ratio=1.5), "warmup_ratio must be in [0, 1)"),
    (dict(max_length=1), "max_length must be >= 2"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(seed=-1), "seed must be in [0, 2**32 - 1], got -1"),
    (dict(seed=2**64), "seed must be in"),
    (dict(memory_budget="bogus"), "memory_budget must be"),
    (dict(memory_budget=0), "memory_budget must be"),
    (dict(lr_scheduler="bogus"), "lr_scheduler must be one of linear, cosine"),
    (dict(loss_type="robust", label_smoothing=0.7), "loss_type 'robust'"),
    (dict(loss_type="sigmoid,sft", loss_weights=[1.0]), "loss_weights"),
    (dict(loss_params={"nope": 1.0}), "nope"),
    (dict(loss_type=" , "), "loss_type is empty"),
    (dict(model=""), "model is required"),
    (dict(reference_free=True, precompute_ref=True), "reference_free excludes"),
])
def test_bad_values_name_the_setting(change, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        cfg.check_config(bad(**change))


def test_the_message_names_the_file_a_value_came_from():
    with pytest.raises(UserInputError, match=r"^run\.json: batch_size must be an integer, got 'four'"):
        cfg.check_config(bad(batch_size="four"), {"batch_size": "run.json"})
    with pytest.raises(UserInputError, match="without quotes"):
        cfg.check_config(bad(lr="0.001"), {"lr": "run.json"})
    # YAML 1.1 reads an exponent without a dot as text.
    with pytest.raises(UserInputError, match=r"^run\.yaml: lr must be a number.*write 1\.0e-3"):
        cfg.check_config(bad(lr="1e-3"), {"lr": "run.yaml"})


@pytest.mark.parametrize("change", [dict(precision="fp64"), dict(precision="fp64", loss_backend="logits"),
                                    dict(model_dtype="float64", precision="fp32")])
def test_float64_weights_need_the_reference_backend(change):
    with pytest.raises(UserInputError, match="needs loss_backend reference.*float32, bfloat16, float16"):
        cfg.check_config(bad(**change))
    cfg.check_config(bad(**{**change, "loss_backend": "reference"}))
    # Under bf16 autocast the kernels see bf16, whatever the weights' dtype.
    cfg.check_config(bad(model_dtype="float64", precision="bf16"))


def test_float16_weights_are_refused_with_the_reason():
    with pytest.raises(UserInputError, match="float16.*eps.*use bfloat16"):
        cfg.check_config(bad(model_dtype="float16"))
    cfg.check_config(bad(model_dtype="bfloat16"))


def test_loss_kwargs_follow_the_loss_table():
    assert set(HYPER_PARAMS) <= set(cfg.FIELDS)
    assert cfg.loss_kwargs(VALID) == {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
    c = bad(loss_type="simpo, sft", gamma=0.7, loss_weights=[1.0, 0.5], loss_params={"tau": 0.2})
    assert cfg.loss_kwargs(c) == {"loss_type": ["simpo", "sft"], "beta": 0.1, "label_smoothing": 0.0,
                                  "loss_weights": [1.0, 0.5], "gamma": 0.7, "tau": 0.2}
    assert cfg.is_reference_free(bad(loss_type="simpo")) and not cfg.is_reference_free(VALID)


def test_precision_settings():
    assert cfg.precision_settings(VALID, "cpu") == (torch.float32, None)
    assert cfg.precision_settings(VALID, "cuda") == (torch.float32, torch.bfloat16)
    assert cfg.precision_settings(bad(precision="fp64", model_dtype="bfloat16"), "cuda") == (torch.float64, None)
