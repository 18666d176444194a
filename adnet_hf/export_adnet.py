"""Deploying exits: every step of an ADNet classifier as its own static graph, and a runner for the exit loop.

A forward pass with exits is data-dependent control flow (which samples go on, how many steps run), which a single
traced graph cannot hold: `torch.export`, `torch.jit` and `torch.compile(fullgraph=True)` fail on it, and work at
full depth (`exit_policy="none"`) only. Each step alone is static, so each is exported on its own:

- `embeddings.onnx`: the model inputs -> the first block's input, the token mask and the blocks' keyword tensors
  (4-D attention mask, positions), all with the batch first;
- `step_NN.onnx`: one step's blocks, then (a step that carries a unit) its calculation unit and the task model's
  output layer -> the step output, the halting probabilities `lambda_n` and the step's logits; a unit that reads
  the step evidence also takes the halting mass not yet halted and (after the first variable step) the previous
  step's logits (`EVIDENCE_INPUTS`);
- `adnet_steps.json`: the manifest (step layout, graph input/output names, the exit settings; no pickle).

`ADNetStepRunner` loads them with ONNX Runtime and runs the exit loop on the host: it decides with the package's
own exit rules (`exits_adnet.exit_decision`, on torch views of the runtime's arrays) and drops the samples that
exited before the next step runs, as the eager `StepEngine` does. Classification heads only (sequence and image);
a causal LM's per-token exits with a key/value cache are not exported.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.utils._pytree import TreeSpec, tree_flatten, tree_flatten_with_path, tree_unflatten

from .backbones_adnet import StepState
from .exits_adnet import EXIT_RULES, FULL_DEPTH, HaltingDistribution, exit_decision, exit_rule

MANIFEST_NAME = "adnet_steps.json"
MANIFEST_FORMAT = "adnet-exported-steps/2"
STEP_OUTPUTS = ("step_hidden", "lambdas", "logits")  # what a step with a unit returns; a fixed step: the first only
EVIDENCE_INPUTS = ("not_halted", "previous_logits")  # what a unit that reads the evidence takes besides the state


def _classifier(model) -> nn.Module:
    """`model` if it is an ADNet classifier (it predicts from pooled unit summaries), else a `TypeError`."""
    from .modeling_adnet import ADNetForImageClassification, ADNetForSequenceClassification

    if not isinstance(model, (ADNetForSequenceClassification, ADNetForImageClassification)):
        raise TypeError(
            "export_steps takes an ADNetForSequenceClassification or ADNetForImageClassification, got "
            f"{type(model).__name__}: a causal LM's per-token exits with a cache are not exported."
        )
    return model


@dataclass
class StateLayout:
    """How a step state travels between graphs as flat tensors: the hidden state, the token mask (text models), the
    blocks' keyword tensors (leaves of `kwargs_spec`), each with a graph name."""

    has_mask: bool
    kwargs_spec: TreeSpec
    names: list[str]

    @classmethod
    def of(cls, state: StepState) -> StateLayout:
        """The layout of the step state `state`."""
        return cls.of_tree(_state_tree(state))

    @classmethod
    def of_tree(cls, tree: tuple) -> StateLayout:
        """The layout of a `_state_tree` (or the embedding graph's output, which has its structure)."""
        _, mask, kwargs = tree
        leaves, kwargs_spec = tree_flatten_with_path(kwargs)
        names = [
            "block_" + "_".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
            for path, _ in leaves
        ]
        return cls(bool(mask), kwargs_spec, ["hidden", *(["token_mask"] if mask else []), *names])


def _state_tree(state: StepState) -> tuple:
    """`(hidden, (token_mask,) or (), block_kwargs)`: no leaf where a CNN has no token mask."""
    return state.hidden, () if state.token_mask is None else (state.token_mask,), state.block_kwargs


class EmbeddingGraph(nn.Module):
    """The backbone's input embedding as a graph: the model inputs -> `_state_tree` of the first block's input.

    The steps take the state laid out as this graph gives it (its program's output spec): a traced embedding always
    builds the 4-D mask, which an eager one leaves out when the batch has no padding."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.adnet, self.input_names = model.adnet, input_names

    def forward(self, *inputs: torch.Tensor) -> tuple:
        return _state_tree(self.adnet.adapter.embed(self.adnet.backbone, dict(zip(self.input_names, inputs))))


def evidence_inputs(engine, step: int) -> list[str]:
    """The `EVIDENCE_INPUTS` that step `step`'s graph takes after the state: none unless its unit reads them."""
    n = step - engine.num_fixed_steps
    if n < 0 or not engine.units[n].reads_evidence:
        return []
    return list(EVIDENCE_INPUTS if n > 0 else EVIDENCE_INPUTS[:1])


class StepGraph(nn.Module):
    """One step as a graph: its blocks on the state of the samples present (flat, as `layout`, then the
    `evidence_inputs`), then, for a variable step, the unit and the task model's output layer. Returns
    `STEP_OUTPUTS` (a fixed step: the step output only)."""

    def __init__(self, model: nn.Module, step: int, layout: StateLayout):
        super().__init__()
        self.model, self.step, self.layout = model, step, layout
        self.engine = model.adnet.step_engine()
        self.blocks = nn.ModuleList(self.engine.steps[step])  # registered, so the export sees their parameters
        self.num_evidence_inputs = len(evidence_inputs(self.engine, step))

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        extra = tensors[len(tensors) - self.num_evidence_inputs :]
        tensors = tensors[: len(tensors) - self.num_evidence_inputs]
        hidden, token_mask = tensors[0], tensors[1] if self.layout.has_mask else None
        leaves = tensors[1 + self.layout.has_mask :]
        state = StepState(hidden, token_mask, tree_unflatten(list(leaves), self.layout.kwargs_spec))
        hidden, _ = self.engine.run_blocks(self.step, state, None, lambda index, output: output)
        n = self.step - self.engine.num_fixed_steps
        if n < 0:
            return (hidden,)
        unit, positions = self.engine.units[n], self.engine.adapter.unit_view(hidden)
        summary = unit.summarise(positions, token_mask)
        logits = self.model.step_head(n, summary, hidden)
        evidence = None
        if extra:
            not_halted, previous = extra[0], extra[1] if len(extra) > 1 else None
            evidence = self.model.read_step_evidence(logits, previous, not_halted)
        return hidden, unit.halt(summary, positions, evidence), logits


def _dynamic_shapes(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[dict, ...]]:
    """For a graph taking `*tensors`: the batch (dim 0) named and dynamic in every tensor; every other dim longer
    than 1 dynamic where the graph allows (the sequence length, an image's sides), static where it fixes it (hidden
    size); a dim of 1 (an image's single channel, the mask's head dim) stays 1."""
    batch = Dim("batch")
    return (
        tuple(
            {0: batch, **{d: Dim.AUTO if t.shape[d] > 1 else Dim.STATIC for d in range(1, t.dim())}} for t in tensors
        ),
    )


def _model_inputs(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> list[str]:
    """The names of `example_inputs`, in the order of the model's `forward`; each must be a tensor with batch >= 2
    (a batch of one would be specialised into the graph)."""
    accepted = [
        name
        for name in inspect.signature(model.forward).parameters
        if name in ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
    ]
    unknown = sorted(set(example_inputs) - set(accepted))
    if unknown or not example_inputs:
        raise ValueError(f"example_inputs must hold model inputs among {accepted}, got {sorted(example_inputs)}.")
    for name, value in example_inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] < 2:
            shape = getattr(value, "shape", value)
            raise ValueError(
                f"example_inputs[{name!r}] must be a tensor with a batch of at least 2 (the batch stays "
                f"dynamic; a batch of 1 would be fixed into the graph), got {shape}."
            )
    return [name for name in accepted if name in example_inputs]


@dataclass
class StepPrograms:
    """`torch.export` programs of an ADNet classifier: `programs[0]` the embedding, then one per step."""

    input_names: list[str]
    state_names: list[str]
    programs: list[ExportedProgram]


def export_step_programs(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> StepPrograms:
    """Export the embedding and every step of an ADNet classifier with `torch.export`, with a dynamic batch (and
    sequence length / image sides). `example_inputs`: one batch (>= 2 samples) of the inputs the deployed model will
    take, e.g. `input_ids` and `attention_mask`."""
    model = _classifier(model).eval()
    names = _model_inputs(model, example_inputs)
    inputs = tuple(example_inputs[name] for name in names)
    with torch.no_grad():
        programs = [torch.export.export(EmbeddingGraph(model, names), inputs, dynamic_shapes=_dynamic_shapes(inputs))]
        state_tree = programs[0].module()(*inputs)
        tensors, layout = tree_flatten(state_tree)[0], StateLayout.of_tree(state_tree)
        previous = None
        for step in range(len(model.adnet.step_engine().steps)):
            graph = StepGraph(model, step, layout)
            extra = [torch.ones(tensors[0].shape[0]), previous][: graph.num_evidence_inputs]
            arguments = (*tensors, *extra)
            programs.append(torch.export.export(graph, arguments, dynamic_shapes=_dynamic_shapes(arguments)))
            outputs = graph(*arguments)
            tensors, previous = [outputs[0], *tensors[1:]], outputs[-1]
    return StepPrograms(names, layout.names, programs)


def export_steps(model: nn.Module, directory: str | Path, example_inputs: dict[str, torch.Tensor]) -> Path:
    """Export an ADNet classifier step by step to ONNX, so that `ADNetStepRunner` can run it with exits.

    A forward pass with exits branches on the values it computes, so it is not one static graph; each step alone
    is. Under `directory` go `embeddings.onnx` (the inputs to the first block's input), one `step_NN.onnx` per step
    (its blocks and, for a step with a unit, the unit and output layer: step output, `lambda_n`, logits) and
    `adnet_steps.json` (names, step layout, exit policy and settings, problem type; no pickle). Every graph goes
    through `torch.export` first and has a dynamic batch and sequence length (image sides). The model is put in
    eval mode. Sequence and image classifiers only: a causal LM's per-token exits with a cache are not exported.

    Args:
        model (ADNetForSequenceClassification | ADNetForImageClassification): The classifier.
        directory (str | Path): Where to write the files (created if missing).
        example_inputs (dict[str, torch.Tensor]): One batch of at least 2 samples of the inputs the deployed model
            will take (e.g. `input_ids` and `attention_mask`; `pixel_values`); a batch of 1 would be fixed into
            the graphs.

    Returns:
        The manifest, `directory / "adnet_steps.json"`.

    Raises:
        ImportError: ONNX is not installed (`pip install 'adnet-hf[onnx]'`).
    """
    _require_onnx("export_steps", "onnx", "onnxscript")
    model = _classifier(model).eval()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    exported = export_step_programs(model, example_inputs)
    engine = model.adnet.step_engine()
    files = ["embeddings.onnx", *(f"step_{step:02d}.onnx" for step in range(len(engine.steps)))]
    for index, (program, file) in enumerate(zip(exported.programs, files)):
        inputs, outputs = (
            (exported.input_names, exported.state_names)
            if index == 0
            else ([*exported.state_names, *evidence_inputs(engine, index - 1)], _step_outputs(engine, index - 1))
        )
        torch.onnx.export(
            program,
            (),
            str(directory / file),
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            external_data=False,
            verbose=False,
        )
    manifest = _manifest(model, exported.input_names, exported.state_names, files)
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _require_onnx(user: str, *modules: str):
    """Import the ONNX packages `user` needs (the last one is returned), naming the extra that installs them."""
    try:
        return [importlib.import_module(module) for module in modules][-1]
    except ImportError as error:
        raise ImportError(f"{user} needs {error.name or modules[0]}: pip install 'adnet-hf[onnx]'.") from error


def _step_outputs(engine, step: int) -> list[str]:
    return list(STEP_OUTPUTS if step >= engine.num_fixed_steps else STEP_OUTPUTS[:1])


def _manifest(model: nn.Module, inputs: list[str], state: list[str], files: list[str]) -> dict:
    """What the runner needs besides the graphs: names, step layout and exit settings, as plain JSON."""
    config = model.config
    engine = model.adnet.step_engine()
    steps = []
    for step, file in enumerate(files[1:]):
        n = step - engine.num_fixed_steps
        blocks = [step * config.layers_per_step + offset for offset in range(len(engine.steps[step]))]
        steps.append(
            {
                "file": file,
                "blocks": blocks,
                "unit": n if n >= 0 else None,
                "evidence_inputs": evidence_inputs(engine, step),
                "outputs": _step_outputs(engine, step),
            }
        )
    return {
        "format": MANIFEST_FORMAT,
        "architecture": type(model).__name__,
        "inputs": inputs,
        "state": state,
        "embeddings": files[0],
        "steps": steps,
        "num_fixed_steps": engine.num_fixed_steps,
        "layers_per_step": config.layers_per_step,
        "num_labels": config.num_labels,
        "exit_policy": config.exit_policy,
        "exit_settings": {
            rule.config_field: getattr(config, rule.config_field)
            for rule in EXIT_RULES.values()
            if hasattr(config, rule.config_field)
        },
        "problem_type": config.problem_type,
        "is_regression": config.is_regression,
    }


@dataclass
class StepRunnerOutput:
    """What `ADNetStepRunner` returns: NumPy arrays laid out as the eager classifier's fields of the same names.

    Attributes:
        logits (np.ndarray): `(batch_size, num_labels)`: each sample's prediction at its exit step.
        exit_steps (np.ndarray): `(batch_size,)`: backbone steps executed per sample.
        halting_probs (np.ndarray): `(batch_size, num_variable_steps)`: the halting distribution (steps after the
            exit: 0).
    """

    logits: np.ndarray
    exit_steps: np.ndarray
    halting_probs: np.ndarray


class ADNetStepRunner:
    """Runs an ADNet classifier exported by `export_steps` with ONNX Runtime, exits and batch shrinking included.

    The steps run as ONNX graphs; between them the runner decides on the host with the package's own exit rules
    (the function the eager model calls), and the samples that exit leave the batch before the next step. Every
    policy works, per call or the exported config's. Its logits, exit steps and halting distribution equal the
    eager model's within float tolerance.

    Args:
        directory (str | Path): What `export_steps` wrote.
        session_options (onnxruntime.SessionOptions | None): For every session, e.g. with
            `intra_op_num_threads`. Defaults to `None` (ONNX Runtime's).
        providers (Sequence[str]): ONNX Runtime execution providers. Defaults to `("CPUExecutionProvider",)`.

    Raises:
        ImportError: ONNX Runtime is not installed (`pip install 'adnet-hf[onnx]'`).
        ValueError: `directory` holds no `export_steps` output, or one of another format.
    """

    def __init__(self, directory: str | Path, session_options=None, providers=("CPUExecutionProvider",)):
        onnxruntime = _require_onnx("ADNetStepRunner", "onnxruntime")

        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(f"directory must hold an export_steps output ({MANIFEST_NAME}), none in {directory}.")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{path} has format {self.manifest.get('format')!r}; this runner reads {MANIFEST_FORMAT!r}."
            )

        def session(file: str):
            return onnxruntime.InferenceSession(str(directory / file), session_options, providers=list(providers))

        self.embeddings = session(self.manifest["embeddings"])
        self.steps = [session(step["file"]) for step in self.manifest["steps"]]
        self.exit_config = SimpleNamespace(
            problem_type=self.manifest["problem_type"],
            is_regression=self.manifest["is_regression"],
            **self.manifest["exit_settings"],
        )

    @property
    def num_variable_steps(self) -> int:
        return len(self.steps) - self.manifest["num_fixed_steps"]

    def __call__(
        self, exit_policy: str | None = None, exit_threshold: float | int | None = None, **inputs: np.ndarray
    ) -> StepRunnerOutput:
        """Run a batch with exits.

        Args:
            exit_policy (str | None): As for the eager model; `"none"` runs full depth. Defaults to `None` (the
                exported config's).
            exit_threshold (float | int | None): The policy's setting for this call. Defaults to `None` (the
                exported config's).
            **inputs (np.ndarray): Exactly the exported inputs, by name (e.g. a tokenizer's output with
                `return_tensors="np"`).

        Returns:
            The logits, exit steps and halting distribution.
        """
        expected = self.manifest["inputs"]
        if sorted(inputs) != sorted(expected):
            raise ValueError(f"inputs must be exactly {expected} (as exported), got {sorted(inputs)}.")
        policy = exit_policy or self.manifest["exit_policy"]
        if policy == FULL_DEPTH and exit_threshold is not None:
            raise ValueError(f"exit_threshold has no effect with exit_policy={FULL_DEPTH!r}.")
        rule = None if policy == FULL_DEPTH else exit_rule(policy, self.exit_config, exit_threshold)
        embedded = self.embeddings.run(None, {name: np.asarray(value) for name, value in inputs.items()})
        state = dict(zip(self.manifest["state"], embedded))
        return self._exit_loop(state, rule)

    def _exit_loop(self, state: dict[str, np.ndarray], rule) -> StepRunnerOutput:
        """The steps on the samples still present; after each variable step `exit_decision` picks who stops, their
        outputs are kept, and they leave `state` (every tensor there has the batch first)."""
        batch, fixed = len(state["hidden"]), self.manifest["num_fixed_steps"]
        active, distribution = np.arange(batch), HaltingDistribution()
        logits = np.zeros((batch, self.manifest["num_labels"]), dtype=state["hidden"].dtype)
        exit_steps = np.zeros(batch, dtype=np.int64)
        halting = np.zeros((batch, self.num_variable_steps), dtype=state["hidden"].dtype)
        previous = None  # the last step's logits of the samples present
        for step, session in enumerate(self.steps):
            not_halted = torch.as_tensor(distribution.not_halted, dtype=torch.float32).expand(len(active))
            evidence = {"not_halted": not_halted.numpy(), "previous_logits": previous}
            outputs = session.run(
                None, {**state, **{name: evidence[name] for name in self.manifest["steps"][step]["evidence_inputs"]}}
            )
            state["hidden"] = outputs[0]
            n = step - fixed
            if n < 0:
                continue
            lambdas, step_logits = torch.from_numpy(outputs[1]), torch.from_numpy(outputs[2])
            stop, probs = exit_decision(
                distribution,
                rule,
                lambdas,
                step_logits,
                n == self.num_variable_steps - 1,
                torch.zeros_like(lambdas, dtype=torch.bool),
            )
            stop = stop.numpy()
            halting[active, n] = probs.numpy()
            exit_steps[active[stop]] = step + 1
            logits[active[stop]] = outputs[2][stop]
            if stop.all():
                break
            keep = np.flatnonzero(~stop)
            active, state = active[keep], {name: value[keep] for name, value in state.items()}
            previous = outputs[2][keep]
            distribution.select(torch.from_numpy(keep))
            if rule is not None:
                rule.select(torch.from_numpy(keep))
        return StepRunnerOutput(logits=logits, exit_steps=exit_steps, halting_probs=halting)
