"""Property-based fuzzing of `ADNetConfig`: every field, through every path that sets one (construction,
`from_pretrained` overrides, a saved `config.json`, assignment after construction).

Each generated case must either work (the config constructs, keeps the values given, saves and reloads equal, and a
tiny model trains one step and runs its exits with finite numbers) or raise a `ValueError` / `TypeError` that names
a field of the case. The allowed values are written out again here, from the documentation, independently of
`configuration_adnet.py`: a value accepted that the documentation refuses is a silent wrong result, a documented
value refused is a wrong refusal. Seeded (`derandomize=True`): every run tries the same cases.
"""

import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import bert_config, gpt2_config, token_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, PreTrainedConfig

from adnet_hf import ADNetConfig, ADNetForSequenceClassification

NUM_BLOCKS = 4  # both fuzzed backbones


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> bool:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return False
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


# A guarantee as `calibrate_exit(..., delta=...)` stores it (README "Risk-controlled calibration").
GUARANTEE = {
    "policy": "halting",
    "value": 0.3,
    "metric": "accuracy",
    "budget": 0.01,
    "delta": 0.1,
    "calibration_size": 400,
    "method": "Learn-then-Test",
}
# The documented values of each field (README "Validation", ADNetConfig's docstring).
DOCUMENTED = {
    "num_fixed_steps": lambda v: _int(v) and v >= 0,
    "layers_per_step": lambda v: _int(v) and v >= 1,
    "unit_hidden_size": lambda v: _int(v) and 1 <= v <= 65_536,
    "share_output_layer": lambda v: isinstance(v, bool),
    "exit_policy": lambda v: v in ("halting", "confidence", "patience", "none"),
    "halting_epsilon": lambda v: _real(v, 0, 1, low_open=True, high_open=True),
    "confidence_threshold": lambda v: _real(v, 0, 1, low_open=True),
    "patience": lambda v: _int(v) and 1 <= v <= 10_000,
    "loss_type": lambda v: v in ("gpsl", "pondernet", "deep_supervision", "last", "layerskip"),
    "gpsl_alpha": lambda v: _real(v, 0, 1e6),
    "gpsl_beta": lambda v: _real(v, 0, 1e6),
    "gpsl_step_cost": lambda v: _real(v, 0, 1e6),
    "gpsl_temperature": lambda v: _real(v, 1e-6, 1e6),
    "gpsl_growth_rate": lambda v: _real(v, 0, 1e6, low_open=True),
    "gpsl_growth_midpoint": lambda v: v is None or _real(v, -1e6, 1e6),
    "pondernet_prior": lambda v: _real(v, 0, 1, low_open=True),
    "pondernet_beta": lambda v: _real(v, 0, 1e6),
    "max_weight_norm": lambda v: v is None or _real(v, 0, 1e6, low_open=True),
    "classifier_dropout": lambda v: _real(v, 0, 1, high_open=True),
    "tie_word_embeddings": lambda v: v is None or isinstance(v, bool),  # None: when constructing only
    "per_token_units": lambda v: v is None or v is False,  # True: a causal LM's units, which a classifier refuses
    "halting_evidence": lambda v: v is None or isinstance(v, bool),
    "gpsl_plateau": lambda v: v in ("settled", "loss"),
    "num_labels": lambda v: _int(v) and 1 <= v <= 100_000,
    "problem_type": lambda v: v in (None, "regression", "single_label_classification", "multi_label_classification"),
    "backbone_config": lambda v: v in ("bert", "gpt2"),  # the names standing for a tiny config (`backbone`)
    "exit_guarantee": lambda v: (
        v is None
        or (
            isinstance(v, dict)
            and set(v) == set(GUARANTEE)
            and v["metric"] == "accuracy"
            and _real(v["budget"], 0, 1)
            and _real(v["delta"], 0, 1, low_open=True, high_open=True)
            and _int(v["calibration_size"])
            and v["calibration_size"] >= 1
            and isinstance(v["method"], str)
            and (v["policy"], v["value"]) in (("none", None), ("halting", 0.3), ("patience", 2))
        )
    ),
    "layer_dropout": lambda v: _real(v, 0, 1, high_open=True),
    "early_exit_loss_scale": lambda v: _real(v, 0, 1),
    "exit_adapters": lambda v: v is False,  # True: a causal LM's, which a classifier refuses
    "exit_distillation": lambda v: v is False,  # the same
    "draft_unit": lambda v: v is False,  # the same
    "draft_vocabulary_size": lambda v: v is None,  # the same
}


def documented(values: dict, path: str = "construct") -> bool:
    """Whether the whole config (defaults, then `values` set through `path`) is one the documentation allows for a
    classifier. Transformers' `from_pretrained` takes a dict for a sub-config as an update of the saved one (BERT)."""
    backbone = values.get("backbone_config")
    if path == "override" and isinstance(backbone, dict) and backbone.get("model_type", "bert") == "bert":
        values = {**values, "backbone_config": "bert"}
    config = {name: getattr(ADNetConfig, name, None) for name in DOCUMENTED} | {"num_labels": 2} | values
    if not all(DOCUMENTED[name](value) for name, value in values.items()):
        return False
    if path == "assign" and "tie_word_embeddings" in values and values["tie_word_embeddings"] is None:
        return False
    if config.get("halting_evidence") and config["per_token_units"]:  # a causal LM's units read no evidence
        return False
    if NUM_BLOCKS % config["layers_per_step"] or config["num_fixed_steps"] >= NUM_BLOCKS // config["layers_per_step"]:
        return False
    problem, labels = config["problem_type"], config["num_labels"]
    regression = problem == "regression" or (problem is None and labels == 1)
    if regression and config["exit_policy"] in ("confidence", "patience"):
        return False
    return not (problem == "single_label_classification" and labels == 1)


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
NOISE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    FLOATS,
    st.text(max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
    st.just({"a": 1}),
)
UNIT_FLOATS = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1e-300, 1 - 1e-16]))
SCALE_FLOATS = st.one_of(st.floats(0, 10), st.sampled_from([0.0, 1e-6, 1e6, 1e6 + 1, 1e300, -1e-9]))
CHOICES = {
    "exit_policy": ["halting", "confidence", "patience", "none", "Halting", "entropy"],
    "loss_type": ["gpsl", "pondernet", "deep_supervision", "last", "layerskip", "gpls", "ce"],
    "gpsl_plateau": ["settled", "loss", "Settled", "plateau"],
    "problem_type": [None, "regression", "single_label_classification", "multi_label_classification", "ranking"],
}
LIKELY = {
    "num_fixed_steps": st.integers(-1, 4),
    "layers_per_step": st.integers(0, 5),
    "unit_hidden_size": st.sampled_from([0, 1, 4, 8, 16, 65_536, 65_537, 10**9]),
    "share_output_layer": st.booleans(),
    "halting_epsilon": UNIT_FLOATS,
    "confidence_threshold": UNIT_FLOATS,
    "patience": st.sampled_from([0, 1, 2, 3, 10_000, 10_001, 10**30]),
    "gpsl_alpha": SCALE_FLOATS,
    "gpsl_beta": SCALE_FLOATS,
    "gpsl_step_cost": SCALE_FLOATS,
    "gpsl_temperature": SCALE_FLOATS,
    "gpsl_growth_rate": SCALE_FLOATS,
    "pondernet_beta": SCALE_FLOATS,
    "gpsl_growth_midpoint": st.one_of(st.none(), st.floats(-1e6, 1e6), st.sampled_from([1e7, -1e300])),
    "pondernet_prior": UNIT_FLOATS,
    "max_weight_norm": st.one_of(st.none(), SCALE_FLOATS),
    "classifier_dropout": UNIT_FLOATS,
    "tie_word_embeddings": st.one_of(st.none(), st.booleans()),
    "per_token_units": st.one_of(st.none(), st.booleans()),
    "halting_evidence": st.one_of(st.none(), st.booleans()),
    "layer_dropout": UNIT_FLOATS,
    "early_exit_loss_scale": UNIT_FLOATS,
    "exit_adapters": st.booleans(),
    "exit_distillation": st.booleans(),
    "draft_unit": st.booleans(),
    "draft_vocabulary_size": st.one_of(st.none(), st.sampled_from([0, 1, 8, -2, 2.5, True])),
    "num_labels": st.sampled_from([0, 1, 2, 3, 5, 100_000, 100_001, 10**9]),
    "backbone_config": st.sampled_from(
        ["bert", "gpt2", {"model_type": "t5"}, {"model_type": "unknown"}, "bert-base", 7]
    ),
    **{name: st.sampled_from(choices) for name, choices in CHOICES.items()},
    "exit_guarantee": st.sampled_from(
        [
            None,
            GUARANTEE,
            {**GUARANTEE, "policy": "none", "value": None},
            {**GUARANTEE, "policy": "patience", "value": 2},
            {**GUARANTEE, "value": 1.5},
            {**GUARANTEE, "delta": 0.0},
            {**GUARANTEE, "budget": 2},
            {**GUARANTEE, "calibration_size": 0},
            {**GUARANTEE, "metric": "mse"},
            {**GUARANTEE, "policy": "none"},
            {**GUARANTEE, "extra": 1},
            {"budget": 0.01},
        ]
    ),
}
FIELDS = sorted(LIKELY)


def field_values(name: str) -> st.SearchStrategy:
    """Mostly plausible values of the field (valid or near its bounds), sometimes anything at all. Not a
    `backbone_config=None`: it means a full-size BERT, too slow to build here (tests/test_configuration.py has it)."""
    noise = NOISE.filter(lambda value: value is not None) if name == "backbone_config" else NOISE
    return st.one_of(LIKELY[name], LIKELY[name], LIKELY[name], noise)


def backbone(value):
    """A fresh tiny backbone config for the names standing for one (a config is mutable: one per case)."""
    return {"bert": bert_config, "gpt2": gpt2_config}[value]() if value in ("bert", "gpt2") else value


# One to three fields, in the order they are set (the order matters to the `assign` path).
CASES = st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: field_values(name) for name in names})
)
PATHS = ("construct", "override", "load", "assign")


def comparable(config: ADNetConfig) -> dict:
    return {name: value for name, value in config.to_dict().items() if name not in ("_name_or_path",)}


def build_classifier(config: ADNetConfig) -> None:
    """Build a classifier where the config holds a causal LM's settings (per-token units, exit adapters,
    distillation, a draft unit), which the classifier refuses when it is built."""
    if any(
        getattr(config, name)
        for name in ("per_token_units", "exit_adapters", "exit_distillation", "draft_unit", "draft_vocabulary_size")
    ):
        ADNetForSequenceClassification(config)


def set_values(path: str, values: dict, folder: Path) -> ADNetConfig:
    """A config with `values` set through `path`."""
    given = {name: backbone(value) if name == "backbone_config" else value for name, value in values.items()}
    if path == "construct":
        return ADNetConfig(**{"backbone_config": bert_config(), "unit_hidden_size": 8, **given})
    ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8).save_pretrained(folder)
    if path == "override":
        return AutoConfig.from_pretrained(folder, **given)
    if path == "load":
        data = json.loads((folder / "config.json").read_text())
        data.update(
            {name: value.to_dict() if isinstance(value, PreTrainedConfig) else value for name, value in given.items()}
        )
        (folder / "config.json").write_text(json.dumps(data))
        return AutoConfig.from_pretrained(folder)
    config, applied = AutoConfig.from_pretrained(folder), {}
    for name, value in values.items():
        before, applied[name] = comparable(config), value
        try:
            setattr(config, name, given[name])
        except (ValueError, TypeError) as error:
            assert comparable(config) == before, f"a refused assignment of {name} was kept"
            error.applied = applied  # what had been assigned when it was refused
            raise
        build_classifier(config)
        assert documented(applied, path), f"accepted the assignments {applied}"
    return config


def labels_for(config: ADNetConfig, batch: int) -> torch.Tensor:
    if config.is_regression:
        return torch.randn(batch) if config.num_labels == 1 else torch.randn(batch, config.num_labels)
    if config.problem_type == "multi_label_classification":
        return torch.randint(0, 2, (batch, config.num_labels)).float()
    return torch.randint(0, config.num_labels, (batch,))


def check_works(config: ADNetConfig, values: dict, folder: Path) -> None:
    """What an accepted config must do: keep the values, reload equal, train a step and exit with finite numbers."""
    for name, value in values.items():
        if name != "backbone_config" and name != "num_labels":
            assert getattr(config, name) == value or (value is None and name == "tie_word_embeddings"), name
    assert config.num_labels == values.get("num_labels", config.num_labels)
    config.save_pretrained(folder / "saved")
    assert comparable(AutoConfig.from_pretrained(folder / "saved")) == comparable(config)
    model = ADNetForSequenceClassification(config).train()
    ids, mask = token_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels_for(config, len(ids)))
    out.loss.backward()
    assert torch.isfinite(out.loss), f"training loss {out.loss}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), "gradients"
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all() and (out.exit_steps <= config.num_steps).all()


def names_a_field(error: Exception, values: dict) -> bool:
    return any(name in str(error) for name in values)


def outcome(path: str, values: dict) -> str:
    """`works`, `clear error`, or a failure: `obscure error`, `silent wrong` or `refused valid`."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            config = set_values(path, values, Path(folder))
            build_classifier(config)
        except (ValueError, TypeError) as error:
            if not names_a_field(error, values):
                return f"obscure error: {type(error).__name__}: {error}"
            refused = getattr(error, "applied", values)
            return "clear error" if not documented(refused, path) else f"refused valid: {error}"
        except AssertionError as error:
            return f"silent wrong: {error}"
        except Exception as error:  # noqa: BLE001 - anything else is what the fuzzing looks for
            return f"obscure error: {type(error).__name__}: {error}"
        if not documented(values, path):
            return "silent wrong: accepted values the documentation refuses"
        try:
            check_works(config, values, Path(folder))
        except AssertionError as error:
            return f"silent wrong: {error}"
        except Exception as error:  # noqa: BLE001
            return f"obscure error: after acceptance, {type(error).__name__}: {error}"
    return "works"


OUTCOMES: Counter = Counter()


def fuzz(path: str, values: dict) -> None:
    result = outcome(path, values)
    OUTCOMES[path, result.split(":")[0]] += 1
    assert result in ("works", "clear error"), f"{path} {values!r}: {result}"


def test_every_config_field_is_fuzzed():
    own = {name for name in ADNetConfig.__dataclass_fields__ if name not in PreTrainedConfig.__dataclass_fields__}
    assert own | {"num_labels", "problem_type"} <= set(LIKELY) == set(DOCUMENTED)


FUZZ_SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(max_examples=100, **FUZZ_SETTINGS)
@given(path=st.sampled_from(PATHS), values=CASES)
def test_fuzz_quick(path, values):
    fuzz(path, values)


@pytest.mark.slow
@settings(max_examples=1200, **FUZZ_SETTINGS)
@given(path=st.sampled_from(PATHS), values=CASES)
def test_fuzz_slow(path, values):
    fuzz(path, values)


def teardown_module():
    """The outcome table (shown with `pytest -s`)."""
    kinds = ("works", "clear error", "obscure error", "silent wrong", "refused valid")
    print("\n| path | cases | " + " | ".join(kinds) + " |\n|---|" + "---|" * (len(kinds) + 1))
    for path in PATHS:
        counts = [OUTCOMES[path, kind] for kind in kinds]
        print(f"| {path} | {sum(counts)} | " + " | ".join(map(str, counts)) + " |")
