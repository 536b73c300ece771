"""Tests for zray.optim: param-group normalization and the optimizer built from the config.

One-step results are checked against values worked out by hand (Adam's first step with bias
correction moves each element by lr * g / (|g| + eps)) and against torch's own optimizers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zray import Config
from zray.errors import ConfigError
from zray.optim import build_optimizer, group_overrides, normalize_param_groups


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)
        self.b = nn.Parameter(torch.ones(5))


def _ids(params: list[torch.Tensor]) -> list[int]:
    return [id(p) for p in params]


# ---- normalize_param_groups ------------------------------------------------------------------


def test_none_means_all_trainable_parameters() -> None:
    m = Small()
    groups = normalize_param_groups(m, None)
    assert len(groups) == 1 and set(groups[0]) == {"params"}
    # Module order: the root's own parameters first, then the submodule's.
    assert _ids(groups[0]["params"]) == _ids([m.b, m.a.weight, m.a.bias])


def test_parameter_iterator() -> None:
    m = Small()
    groups = normalize_param_groups(m, m.parameters())
    # Taken as given: the caller's list, frozen parameter included.
    assert _ids(groups[0]["params"]) == _ids([m.frozen, m.b, m.a.weight, m.a.bias])
    assert len(groups) == 1


def test_named_pairs() -> None:
    m = Small()
    groups = normalize_param_groups(m, m.named_parameters())
    assert _ids(groups[0]["params"]) == _ids([m.frozen, m.b, m.a.weight, m.a.bias])


def test_group_dicts_keep_overrides() -> None:
    m = Small()
    given = [
        {"params": (p for p in [m.a.weight, m.b]), "weight_decay": 0.1},
        {"params": [("a.bias", m.a.bias)], "lr": 0.5, "betas": (0.8, 0.9)},
        {"params": m.frozen},
    ]
    groups = normalize_param_groups(m, given)
    assert len(groups) == 3
    assert _ids(groups[0]["params"]) == _ids([m.a.weight, m.b])
    assert groups[0]["weight_decay"] == 0.1
    assert _ids(groups[1]["params"]) == _ids([m.a.bias])
    assert (groups[1]["lr"], groups[1]["betas"]) == (0.5, (0.8, 0.9))
    assert _ids(groups[2]["params"]) == _ids([m.frozen])
    assert group_overrides(groups[1]) == {"lr": 0.5, "betas": (0.8, 0.9)}
    assert group_overrides({**groups[0], "foo": 1}) == {"weight_decay": 0.1}


def test_group_dict_without_params_names_the_index() -> None:
    m = Small()
    with pytest.raises(ValueError) as exc:
        normalize_param_groups(m, [{"params": [m.b]}, {"lr": 0.1}])
    assert str(exc.value) == "model_parameters[1]: a param group needs a 'params' entry"


def test_bad_item_names_index_and_type() -> None:
    m = Small()
    with pytest.raises(ValueError) as exc:
        normalize_param_groups(m, [m.b, m.a.weight, "a.bias"])
    msg = str(exc.value)
    assert msg.startswith("model_parameters[2]: got str; allowed: ")
    assert "(name, parameter) pairs" in msg and "param-group dicts" in msg


def test_mixed_params_and_dicts_is_an_error() -> None:
    m = Small()
    with pytest.raises(ValueError, match=r"^model_parameters\[1\]: got dict;"):
        normalize_param_groups(m, [m.b, {"params": [m.a.weight]}])


# ---- build_optimizer -------------------------------------------------------------------------

P0 = [1.0, -2.0, 0.5]
G = [0.1, -0.3, 0.05]


def _segment() -> torch.Tensor:
    t = torch.tensor(P0, requires_grad=True)
    t.grad = torch.tensor(G)
    return t


def _spec(d: dict) -> object:
    return Config.from_dict({"optimizer": d}).optimizer


def _one_step(opt: torch.optim.Optimizer) -> torch.Tensor:
    opt.step()
    return opt.param_groups[0]["params"][0].detach().clone()


ADAM = {"lr": 0.1, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8}


def test_adam_with_adam_w_mode_is_adamw() -> None:
    opt = build_optimizer(_spec({"type": "Adam", "params": ADAM}), [{"params": [_segment()]}])
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"]) == (0.1, 0.1, (0.9, 0.999), 1e-8)
    # Decoupled: p * (1 - lr * wd) - lr * g / (|g| + eps)
    expected = torch.tensor([0.89, -1.88, 0.395])
    got = _one_step(opt)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    ref = torch.optim.AdamW([_segment()], lr=0.1, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    torch.testing.assert_close(got, _one_step(ref), rtol=0, atol=0)


def test_adam_without_adam_w_mode_is_l2_adam() -> None:
    params = {**ADAM, "adam_w_mode": False}
    opt = build_optimizer(_spec({"type": "Adam", "params": params}), [{"params": [_segment()]}])
    assert type(opt) is torch.optim.Adam
    # L2: g' = g + wd * p = [0.2, -0.5, 0.1]; p - lr * g' / (|g'| + eps)
    expected = torch.tensor([0.9, -1.9, 0.4])
    got = _one_step(opt)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    ref = torch.optim.Adam([_segment()], lr=0.1, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    torch.testing.assert_close(got, _one_step(ref), rtol=0, atol=0)


def test_type_adamw_is_adamw() -> None:
    opt = build_optimizer(_spec({"type": "AdamW", "params": ADAM}), [{"params": [_segment()]}])
    assert type(opt) is torch.optim.AdamW


def test_group_overrides_reach_the_optimizer() -> None:
    spec = _spec({"type": "Adam", "params": ADAM})
    a, b = _segment(), _segment()
    opt = build_optimizer(spec, [{"params": [a]}, {"params": [b], "weight_decay": 0.0}])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([0.89, -1.88, 0.395]), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.tensor([0.9, -1.9, 0.4]), rtol=0, atol=1e-6)


def _sgd_two_steps(opt: torch.optim.Optimizer) -> list[list[float]]:
    out = []
    for _ in range(2):
        opt.step()
        out.append(opt.param_groups[0]["params"][0].detach().tolist())
    return out


def _sgd_segment() -> torch.Tensor:
    t = torch.zeros(2, requires_grad=True)
    t.grad = torch.tensor([1.0, -2.0])
    return t


def test_sgd_momentum() -> None:
    spec = _spec({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}})
    opt = build_optimizer(spec, [{"params": [_sgd_segment()]}])
    assert type(opt) is torch.optim.SGD
    g = opt.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["dampening"], g["weight_decay"]) == (0.9, False, 0, 0)
    # buf = g, then 1.9 g: p1 = -0.1 g, p2 = p1 - 0.19 g
    got = _sgd_two_steps(opt)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([[-0.1, 0.2], [-0.29, 0.58]]))


def test_sgd_nesterov() -> None:
    spec = _spec({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}})
    opt = build_optimizer(spec, [{"params": [_sgd_segment()]}])
    assert opt.param_groups[0]["nesterov"] is True
    # step 1: buf = g, d = g + 0.9 buf = 1.9 g; step 2: buf = 1.9 g, d = g + 0.9 * 1.9 g = 2.71 g
    got = _sgd_two_steps(opt)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([[-0.19, 0.38], [-0.461, 0.922]]))


def test_client_optimizer_instance_rebuilt_over_the_groups() -> None:
    dummy = nn.Parameter(torch.zeros(1))
    client = torch.optim.SGD([dummy], lr=0.3, momentum=0.5, weight_decay=0.01)
    seg, other = _sgd_segment(), _sgd_segment()
    opt = build_optimizer(None, [{"params": [seg]}, {"params": [other], "lr": 0.7}], client)
    assert type(opt) is torch.optim.SGD and opt is not client
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.7]
    assert opt.param_groups[0]["momentum"] == 0.5
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[0]["params"][0] is seg
    assert all(p is not dummy for g in opt.param_groups for p in g["params"])


def test_client_instance_wins_over_the_config() -> None:
    client = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.02)
    spec = _spec({"type": "SGD", "params": {"lr": 0.1}})
    opt = build_optimizer(spec, [{"params": [_segment()]}], client)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 0.02


def test_client_callable_gets_the_groups() -> None:
    seen = []

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        seen.append(groups)
        return torch.optim.SGD(groups, lr=0.25)

    groups = [{"params": [_segment()]}]
    opt = build_optimizer(None, groups, make)
    assert seen == [groups]
    assert opt.param_groups[0]["lr"] == 0.25


def test_no_optimizer_is_an_error() -> None:
    with pytest.raises(ValueError) as exc:
        build_optimizer(None, [{"params": [_segment()]}])
    msg = str(exc.value)
    assert msg.startswith("optimizer: no optimizer given")
    assert "optimizer=" in msg


# ---- input checks --------------------------------------------------------------------------


def test_bare_tensor_is_an_error() -> None:
    m = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"model_parameters"):
        normalize_param_groups(m, m.weight)


def test_bad_entry_inside_a_group_names_the_index() -> None:
    with pytest.raises(ValueError, match=r"model_parameters\[0\]"):
        normalize_param_groups(nn.Linear(2, 3), [{"params": ["oops"]}])


def test_adam_bias_correction_false_is_refused_with_the_reason() -> None:
    """zray steps with torch's Adam, which always corrects the bias: a config asking otherwise is
    refused at load, naming the key (it used to be an early return, a test that could not
    fail)."""
    params = {**ADAM, "weight_decay": 0.0, "bias_correction": False}
    with pytest.raises(ConfigError) as e:
        _spec({"type": "Adam", "params": params})
    assert e.value.key == "optimizer.params.bias_correction" and e.value.value is False
    assert "always corrects the bias" in str(e.value)
