"""The loss table: its order agrees with the C++ enum, and the settings checks, help texts and validation all read
their ranges from it."""
import math
import re

import pytest

from dpo_kernels.loss_op.loss_types import (
    HYPER_PARAMS,
    LOSS_TYPES,
    LOSSES,
    Range,
    hyper_param_help,
    loss_type_help,
)
from dpo_kernels.loss_op.spec import LOSS_PARAM_NAMES, check_loss_settings, op_params, validate_spec
from tests.helpers import REPO_ROOT


def _snake_case(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def test_cpp_enum_matches_the_table_order():
    header = (REPO_ROOT / "csrc" / "dpo_loss_math.h").read_text()
    body = re.search(r"enum LossType\s*:\s*int\s*\{(.*?)\};", header, re.S)
    assert body, "enum LossType not found in csrc/dpo_loss_math.h"
    names = [re.match(r"\s*k(\w+)", entry).group(1) for entry in body.group(1).split(",") if entry.strip()]
    assert names[-1] == "NumLossTypes"
    assert re.search(r"kSigmoid\s*=\s*0\b", body.group(1)), "the enum must start at 0"
    assert "=" not in body.group(1).split(",", 1)[1], "only the first enumerator may have a value"
    assert tuple(_snake_case(n) for n in names[:-1]) == LOSS_TYPES


def test_every_loss_reads_only_known_parameters():
    for name, info in LOSSES.items():
        for param in info.params:
            assert param in HYPER_PARAMS and param not in ("beta", "loss_weights"), (name, param)


def _just_outside(valid: Range) -> list:
    """Values the range rejects, next to each finite bound."""
    out = []
    if math.isfinite(valid.low):
        out.append(valid.low if valid.low_open else valid.low - 1e-3)
    if math.isfinite(valid.high):
        out.append(valid.high if valid.high_open else valid.high + 1e-3)
    return out


def _just_inside(valid: Range) -> list:
    low = valid.low + (1e-3 if valid.low_open else 0.0) if math.isfinite(valid.low) else -1.0
    high = valid.high - (1e-3 if valid.high_open else 0.0) if math.isfinite(valid.high) else low + 5.0
    return [low, high]


def _settings(loss, param, value):
    if param == "label_smoothing":
        return dict(label_smoothing=value)
    return dict(loss_params={param: value})


@pytest.mark.parametrize("loss", [name for name in LOSS_TYPES if LOSSES[name].params])
def test_each_loss_checks_its_parameter_ranges(loss):
    for param, valid in LOSSES[loss].params.items():
        for value in _just_inside(valid):
            check_loss_settings(loss, **_settings(loss, param, value))
        for value in _just_outside(valid):
            with pytest.raises(ValueError, match=re.escape(valid.describe(param))) as err:
                check_loss_settings(loss, **_settings(loss, param, value))
            assert param in str(err.value) and repr(loss) in str(err.value)
            # A loss that does not read the parameter ignores it, as TRL does.
            check_loss_settings("hinge", **_settings("hinge", param, value))


def test_combined_losses_check_per_loss_smoothing():
    check_loss_settings(["sigmoid", "robust"], label_smoothing=[0.9, 0.1])
    with pytest.raises(ValueError, match="'robust'"):
        check_loss_settings(["sigmoid", "robust"], label_smoothing=[0.1, 0.9])


@pytest.mark.parametrize("settings, message", [
    (dict(beta=0.0), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(loss_params={"loss_weights": [1.0, 2.0]}), "loss_weights"),
    (dict(loss_params={"gamma": float("nan")}), "gamma"),
    (dict(loss_params={"discopop_tau": 0.1}), "unknown loss parameter"),
])
def test_check_loss_settings_names_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        check_loss_settings("sigmoid", **settings)


def test_check_loss_settings_defaults_come_from_the_table():
    spec = check_loss_settings(["sigmoid", "hinge"])
    assert spec.beta == HYPER_PARAMS["beta"].default
    for term in spec.terms:
        assert tuple(term) == tuple(HYPER_PARAMS)
        assert dict(term) == {name: param.default for name, param in HYPER_PARAMS.items()}
    assert set(LOSS_PARAM_NAMES) == set(HYPER_PARAMS) - {"beta", "label_smoothing"}


def test_a_scalar_loss_weight_applies_to_every_term():
    assert check_loss_settings(["sigmoid", "hinge"], loss_params={"loss_weights": 0.5}).values("loss_weights") == (
        0.5, 0.5)


def test_op_params_are_each_terms_row_in_table_order():
    spec = check_loss_settings(["simpo", "dpop"], beta=0.3, label_smoothing=[0.1, 0.0],
                               loss_params={"loss_weights": [1.0, 2.0], "gamma": 0.7, "dpop_lambda": 9.0})
    rows = [dict(beta=0.3, label_smoothing=0.1, loss_weights=1.0, gamma=0.7, tau=HYPER_PARAMS["tau"].default,
                 dpop_lambda=9.0),
            dict(beta=0.3, label_smoothing=0.0, loss_weights=2.0, gamma=0.7, tau=HYPER_PARAMS["tau"].default,
                 dpop_lambda=9.0)]
    assert op_params(spec) == tuple(row[name] for row in rows for name in HYPER_PARAMS)


def test_cpp_hyper_param_order_matches_the_table():
    """The op reads each term's row of `params` by `enum HyperParam` (csrc/dpo_loss_math.h); the compiled extension
    reports the name of each enumerator in that order (`hyper_param_name`)."""
    from dpo_kernels import _C

    header = (REPO_ROOT / "csrc" / "dpo_loss_math.h").read_text()
    body = re.search(r"enum HyperParam\s*:\s*int\s*\{(.*?)\};", header, re.S)
    assert body, "enum HyperParam not found in csrc/dpo_loss_math.h"
    entries = [entry.strip() for entry in body.group(1).split(",") if entry.strip()]
    assert re.fullmatch(r"k\w+\s*=\s*0", entries[0]) and not any("=" in e for e in entries[1:]), (
        "the enumerators must count from 0")
    names = [re.match(r"k(\w+)", entry).group(1) for entry in entries]
    assert tuple(_snake_case(n) for n in names) == tuple(HYPER_PARAMS) + ("num_hyper_params",)
    assert _C.hyper_param_names() == tuple(HYPER_PARAMS), (
        "hyper_param_name names an enumerator wrongly, or the extension is stale (`python setup.py build_ext "
        "--inplace`)")


def test_lengths_are_checked_only_with_tensors():
    check_loss_settings("simpo")
    with pytest.raises(ValueError, match="length-normalized"):
        validate_spec("simpo", 0.1, 0.0, None, None, {})


def test_help_lists_every_loss_and_parameter():
    text = loss_type_help()
    for name, info in LOSSES.items():
        line = next(line for line in text.splitlines() if line.split()[:1] == [name])
        assert info.summary in line
        for param, valid in info.params.items():
            assert valid.describe(param) in line
    params = hyper_param_help()
    for name, param in HYPER_PARAMS.items():
        assert any(line.split()[:1] == [name] and param.help in line for line in params.splitlines()), name


def test_range_describe():
    assert Range(0.0, 0.5, high_open=True).describe("eps") == "0 <= eps < 0.5"
    assert Range(0.0, low_open=True).describe("tau") == "tau > 0"
    assert Range(0.0).describe("gamma") == "gamma >= 0"
    assert Range(high=1.0, high_open=True).describe("x") == "x < 1"
