"""Every key zray accepts either acts or is declared as zray's own decision (issue: honest keys).

The walk: every field of every config section must be read by code outside `zray/config`
(an attribute access `.name` somewhere in the package), be consumed inside the config package
by logic listed below with what it feeds, or be in `DECIDED_KEYS` (accepted, warned about when
set, changes nothing). A new field that nothing reads fails here. The read check is textual, so
a field named like an attribute of something else (`enabled`, `device`) passes on that name;
the reverse check, that no decided key is read outside the config, keeps the list from hiding a
key that acts.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

import zray.config
from zray.config import Config
from zray.config import fields as config_fields
from zray.config.fields import Section, join
from zray.config.ignored import DECIDED_KEYS, IGNORED_KEYS
from zray.config.schedulers import ScheduleParams
from zray.errors import ZrayConfigWarning

PACKAGE = Path(zray.config.__file__).resolve().parent.parent

# Fields whose value the config package itself turns into something the engine reads.
CONSUMED_IN_CONFIG = {
    "train_micro_batch_size_per_gpu": "config/batch.py: the batch sizes the engine uses",
    "elasticity": "config/batch.py: elastic batch plans",
    "elasticity.max_train_batch_size": "config/batch.py: elastic batch plans",
    "elasticity.micro_batch_sizes": "config/batch.py: elastic batch plans",
    "elasticity.min_gpus": "config/batch.py: elastic batch plans",
    "elasticity.max_gpus": "config/batch.py: elastic batch plans",
    "elasticity.prefer_larger_batch": "config/batch.py: elastic batch plans",
    "elasticity.num_gpus_per_node": "config/batch.py: elastic batch plans",
    "elasticity.model_parallel_size": "config/batch.py: elastic batch plans",
    "elasticity.ignore_non_elastic_batch_info": "config/root.py: which batch keys win",
    "elasticity.version": "config/run.py: DeepSpeed's version rules for the plans",
    "optimizer.params.adam_w_mode": "OptimizerConfig.decoupled_weight_decay",
    "optimizer.params.bias_correction": "refused unless true (torch's Adam always corrects)",
}


def _sections() -> list[type[Section]]:
    out: list[type[Section]] = []
    todo = list(Section.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if dataclasses.is_dataclass(cls) and cls not in out:
            out.append(cls)
    # A base of other sections (OffloadConfig) has no place in the JSON of its own.
    return [c for c in out if not any(issubclass(o, c) and o is not c for o in out)]


def _keys() -> dict[str, str]:
    """Every accepted key -> its field name."""
    keys = {}
    for cls in _sections():
        if issubclass(cls, ScheduleParams):
            continue  # passed whole to the schedule's constructor: test_config pins them to it
        for f in dataclasses.fields(cls):
            keys[f.metadata.get("key") or join(cls._path, f.name)] = f.name
    return keys


def _read_outside_config(name: str) -> bool:
    pattern = re.compile(rf"\.{re.escape(name)}\b")
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "config":
            continue
        if pattern.search(path.read_text()):
            return True
    return False


def test_every_accepted_key_acts_or_is_declared_as_zrays_decision() -> None:
    unaccounted = [
        key
        for key, name in sorted(_keys().items())
        if key not in DECIDED_KEYS
        and key not in CONSUMED_IN_CONFIG
        and not _read_outside_config(name)
    ]
    assert unaccounted == [], f"read by nothing and not declared: {unaccounted}"


def test_every_decided_key_is_an_accepted_key_that_nothing_reads() -> None:
    keys = _keys()
    for key in DECIDED_KEYS:
        assert key in keys, f"{key} is not a config field"
        assert key not in IGNORED_KEYS, key
        name = keys[key]
        # Generic names are read elsewhere for other objects; the ones listed are specific.
        assert not _read_outside_config(name), f"{key} is read outside the config: it acts"


@pytest.mark.parametrize("key", sorted(DECIDED_KEYS))
def test_a_decided_key_set_away_from_its_default_warns_once(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_fields, "_WARNED_KEYS", set())
    *parents, leaf = key.split(".")
    value = _OTHER.get(key, _other_value(_field_default(key)))
    raw: dict = {leaf: value}
    for p in reversed(parents):
        raw = {p: raw}
    if key.startswith("zero_optimization."):
        raw["zero_optimization"]["stage"] = 3
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Config.from_dict(raw)
        Config.from_dict(raw)
    got = [str(w.message) for w in record if issubclass(w.category, ZrayConfigWarning)]
    assert got == [f"{key}: accepted, but zray decides this itself: {DECIDED_KEYS[key]}"]


def _field_default(key: str) -> object:
    for cls in _sections():
        for f in dataclasses.fields(cls):
            if (f.metadata.get("key") or join(cls._path, f.name)) == key:
                return f.default
    raise KeyError(key)


_OTHER = {
    "zero_optimization.offload_optimizer.ratio": 0.5,  # partial offload, as DeepSpeed reads it
    "zero_optimization.overlap_comm": False,  # default None: follows the stage
}


def _other_value(default: object) -> object:
    """A valid value other than `default` (the decided keys are flags, sizes, counts, paths)."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 1
    if default is None:
        return "/nvme"  # the other None defaults among them are paths
    raise AssertionError(f"no other value for {default!r}")


def test_a_config_sent_to_workers_is_reread_without_repeating_warnings() -> None:
    """The driver warns about what the user wrote; the workers read the driver's to_dict() of it
    again and must not warn once more each (nor mark the key as warned)."""
    user = {"zero_optimization": {"stage": 2, "overlap_comm": True}}  # off by default at 2
    sent = Config.from_dict(user).to_dict()
    config_fields._WARNED_KEYS.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = Config.reread(sent)
    assert [w for w in record if issubclass(w.category, ZrayConfigWarning)] == []
    assert again == Config.from_dict(user)
    config_fields._WARNED_KEYS.clear()  # a worker is a process of its own
    with pytest.warns(ZrayConfigWarning, match="zero_optimization.overlap_comm"):
        Config.from_dict(sent)  # what each worker did before: the warning again


def test_a_refused_config_gets_its_error_and_no_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warnings are held until the whole config is valid: partial optimizer offload at stage 2
    is refused with one error, not a 'decided key' warning followed by the error (seen in the
    newcomer run: two lines for one mistake). The same key at stage 3 still warns."""
    monkeypatch.setattr(config_fields, "_WARNED_KEYS", set())
    offload = {"device": "cpu", "ratio": 0.5}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(zray.errors.ConfigError, match=r"offload_optimizer\.ratio.*stage 3"):
            Config.from_dict({"zero_optimization": {"stage": 2, "offload_optimizer": offload}})
    assert [w for w in record if issubclass(w.category, ZrayConfigWarning)] == []
    with pytest.warns(ZrayConfigWarning, match=r"offload_optimizer\.ratio: accepted") as got:
        Config.from_dict({"zero_optimization": {"stage": 3, "offload_optimizer": offload}})
    assert got[0].filename == __file__  # points at the caller, not at zray or contextlib
