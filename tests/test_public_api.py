"""The public API is what the documentation teaches (quick tier): every name in `adnet_hf.__all__` imports from the
package and is documented, each documented callable names every parameter it takes (with its default), and
`import adnet_hf` leaves the optional packages (PEFT, ONNX, datasets, ...) unimported.

The API reference (docs/api/) renders these docstrings, so a parameter missing here is missing there.
"""

import ast
import dataclasses
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import adnet_hf
from adnet_hf import (
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetLoss,
    ADNetModel,
    ADNetPreTrainedModel,
    ADNetStepRunner,
    ADNetTrainingArguments,
    ExitRule,
)
from adnet_hf.configuration_adnet import field_rules

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adnet_hf"

# The methods the API reference shows besides the classes themselves: what a user calls or implements.
METHODS = {
    "ADNetPreTrainedModel.from_backbone": ADNetPreTrainedModel.from_backbone,
    "ADNetModel.forward": ADNetModel.forward,
    "ADNetForSequenceClassification.forward": ADNetForSequenceClassification.forward,
    "ADNetForImageClassification.forward": ADNetForImageClassification.forward,
    "ADNetForCausalLM.forward": ADNetForCausalLM.forward,
    "ADNetForCausalLM.generate": ADNetForCausalLM.generate,
    "ADNetStepRunner.__call__": ADNetStepRunner.__call__,
    "ExitRule.is_valid": ExitRule.is_valid,
    "ExitRule.check": ExitRule.check,
    "ExitRule.candidates": ExitRule.candidates,
    "ExitRule.step": ExitRule.step,
    "ExitRule.select": ExitRule.select,
    "ADNetLoss.forward": ADNetLoss.forward,
    "ADNetLoss.row_losses": ADNetLoss.row_losses,
}
# Configs whose docstring states every field's default exactly (`Defaults to `value``).
CONFIGS = (ADNetConfig, ADNetTrainingArguments)
# Packages that only an extra installs, or that only the examples, benchmarks and tests use.
OPTIONAL = ("peft", "onnx", "onnxruntime", "onnxscript", "datasets", "evaluate", "sklearn", "scipy")
HISTORY = re.compile(r"\bissue #?\d+|\breplay|\bearlier runs?\b|\bwas [0-9.]+ before\b", re.IGNORECASE)


def own_docstring(obj) -> str | None:
    """The docstring `obj` itself declares: not one inherited from a base class, nor the signature a dataclass
    writes where there is none."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not doc or (dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return None
    return inspect.cleandoc(doc)


def attribute_docstring(name: str) -> str | None:
    """The docstring under a module-level assignment of `name` in the package (what mkdocstrings renders for a
    constant such as `EXIT_RULES`)."""
    for path in sorted(PACKAGE.glob("*.py")):
        body = ast.parse(path.read_text()).body
        for statement, following in zip(body, body[1:]):
            targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
            if any(isinstance(target, ast.Name) and target.id == name for target in targets):
                if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                    return following.value.value
    return None


def entry(doc: str, name: str) -> str | None:
    """The docstring entry of `name` in an `Args:` / `Attributes:` section (`name (type): text`, continuation lines
    indented deeper) on one line, or None."""
    lines = doc.splitlines()
    pattern = re.compile(rf"^(\s+)\**{re.escape(name)}(\s*\([^)]*\))?:(\s|$)")
    for index, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            indent = len(match.group(1))
            text = [line]
            for following in lines[index + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                text.append(following)
            return " ".join("\n".join(text).split())  # one line: a default may break across two
    return None


def declared_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields that classes of this package declare (not those of a Transformers base)."""
    own = {
        name
        for klass in cls.__mro__
        if klass.__module__.startswith("adnet_hf")
        for name in klass.__dict__.get("__annotations__", {})
    }
    return [field for field in dataclasses.fields(cls) if field.name in own]


def parameters(obj) -> list[inspect.Parameter]:
    """The named parameters of a function or class constructor (not `self`, `cls`, `*args`, `**kwargs`)."""
    return [
        parameter
        for parameter in inspect.signature(obj).parameters.values()
        if parameter.name not in ("self", "cls")
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def documented_callables() -> dict[str, object]:
    """Every class and function of `__all__`, and the `METHODS` the reference shows."""
    exported = {name: getattr(adnet_hf, name) for name in adnet_hf.__all__}
    return {
        **{name: obj for name, obj in exported.items() if inspect.isclass(obj) or inspect.isfunction(obj)},
        **METHODS,
    }


def quoted(value) -> str:
    """`value` as a docstring's `Defaults to` states it."""
    return f"`{value!r}`".replace('"', "'")


def test_all_lists_each_name_once():
    assert len(adnet_hf.__all__) == len(set(adnet_hf.__all__))


@pytest.mark.parametrize("name", adnet_hf.__all__)
def test_exported_name_imports_and_has_a_docstring(name):
    namespace: dict = {}
    exec(f"from adnet_hf import {name}", namespace)
    obj = namespace[name]
    assert obj is getattr(adnet_hf, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = own_docstring(obj)
    else:
        doc = attribute_docstring(name)
    assert doc and len(doc.split()) >= 5, f"adnet_hf.{name} has no docstring of its own"


@pytest.mark.parametrize("name", list(documented_callables()))
def test_docstring_documents_every_parameter(name):
    obj = documented_callables()[name]
    doc = own_docstring(obj)
    assert doc, f"{name} has no docstring of its own"
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        expected = {field.name: field.default for field in declared_fields(obj)}
        stated_defaults = obj in CONFIGS
    else:
        expected = {parameter.name: parameter.default for parameter in parameters(obj)}
        stated_defaults = True
    missing = [parameter for parameter in expected if entry(doc, parameter) is None]
    assert not missing, f"{name}'s docstring has no entry for {missing}"
    if stated_defaults:
        no_default = [
            parameter
            for parameter, default in expected.items()
            if default not in (inspect.Parameter.empty, dataclasses.MISSING)
            and "Defaults to" not in entry(doc, parameter)
        ]
        assert not no_default, f"{name}'s docstring does not state the default of {no_default}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.__name__)
def test_config_docstring_states_each_field_type_and_default(config):
    doc = own_docstring(config)
    for field in declared_fields(config):
        text = entry(doc, field.name)
        assert text is not None, f"{config.__name__}'s docstring lacks {field.name}"
        assert re.match(rf"{field.name} \([^)]+\):", text), f"{field.name}: no type"
        assert f"Defaults to {quoted(field.default)}" in text.replace('"', "'"), f"{field.name}: no default"


def test_adnet_config_docstring_names_every_checked_field():
    """Every field the config checks, its own and `PreTrainedConfig`'s it constrains (`num_labels`,
    `problem_type`), and every exit rule's setting."""
    doc = own_docstring(ADNetConfig)
    own = [field.name for field in declared_fields(ADNetConfig)]
    assert len(own) >= 29
    missing = [name for name in {*own, *field_rules()} if entry(doc, name) is None]
    assert not missing, missing
    assert "gpsl_*" not in doc


def test_every_exported_name_has_a_reference_entry():
    """docs/api renders each name of `__all__` (`::: adnet_hf.Name`), and only those."""
    text = "".join(page.read_text() for page in sorted((ROOT / "docs" / "api").glob("*.md")))
    shown = set(re.findall(r"^::: adnet_hf\.(\w+)", text, re.MULTILINE))
    assert shown == set(adnet_hf.__all__), (set(adnet_hf.__all__) - shown, shown - set(adnet_hf.__all__))


def test_docstrings_hold_no_development_history():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                found = HISTORY.search(doc)
                assert not found, f"{path.name}: {getattr(node, 'name', 'module')}'s docstring says {found.group()!r}"


IMPORTED = textwrap.dedent("""
    import importlib
    import json
    import sys

    importlib.import_module(sys.argv[1])
    print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules} & set(sys.argv[2:]))))
""")


def optional_imported_by(module: str) -> set[str]:
    """The `OPTIONAL` packages that importing `module` in a fresh interpreter imports."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORTED, module, *OPTIONAL],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_import_adds_no_optional_package():
    """`import adnet_hf` imports no optional package beyond those `transformers.modeling_utils`, which every
    Transformers model needs, imports itself (it imports scipy where scipy is installed). The training names load on
    first use, since Transformers' `Trainer` and `TrainingArguments` import PEFT and datasets."""
    imported = optional_imported_by("adnet_hf")
    baseline = optional_imported_by("transformers.modeling_utils")
    assert not imported - baseline, f"import adnet_hf imports {sorted(imported - baseline)}"
    assert not imported & {"peft", "onnx", "onnxruntime", "onnxscript", "datasets", "evaluate", "sklearn"}
