"""Exits under FSDP2 with one unit per backbone block, on CPU processes (gloo): wall-clock and blocks run per
process with exits, against full depth under the same sharding.

A sharded block is a collective, so a process whose samples have all exited still runs each block (on a
one-sample stand-in) while any other process needs it: exits save compute, never communication, and the
processes advance together (`blocks_run_per_batch`, against `blocks_needed_per_batch`: the deepest exit of
the process's own batch, all it would run alone). Each process gets its own batches of random tokens and its
own halting epsilon (half its samples stop after unit `--split_unit` + 2 x its rank); the model is a small
random BERT ADNet.

    python -m benchmarks.bench_sharded
"""

from __future__ import annotations

import json
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig

from adnet_hf import ADNetConfig, ADNetForSequenceClassification

from .common import benchmark_parser, interleaved_seconds, parse_benchmark_args, write_results

BACKBONE = {
    "vocab_size": 1000,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 128,
}


def sharded_model() -> ADNetForSequenceClassification:
    """The same random model on every process (seeded), each block its own FSDP2 unit, then the root."""
    torch.manual_seed(0)
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=BertConfig(**BACKBONE), num_labels=2)).eval()
    for block in model.base_model.backbone.encoder.layer:
        fully_shard(block)
    return fully_shard(model)


def split_threshold(model, batches: list[torch.Tensor], unit: int) -> float:
    """A halting epsilon that splits this process's samples in two halves: those that stop after unit `unit` and
    those that go on (a random backbone's states differ too little between inputs to spread exits otherwise)."""
    with torch.no_grad():
        probs = torch.cat(
            [model(input_ids=ids, exit_policy="none", output_step_logits=True).halting_probs for ids in batches]
        )
    not_halted = 1 - probs[:, : unit + 1].sum(-1)
    return float(not_halted.median())


def count_block_calls(model) -> list[int]:
    """A one-element counter of block forward calls (stand-ins included)."""
    calls = [0]
    for block in model.base_model.backbone.encoder.layer:
        block.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def measure_rank(rank: int, port: int, args, out: Path) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.processes,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(args.threads)
    model = sharded_model()
    calls = count_block_calls(model)
    generator = torch.Generator().manual_seed(1 + rank)
    batches = [
        torch.randint(3, BACKBONE["vocab_size"], (args.batch_size, args.length), generator=generator)
        for _ in range(args.batches)
    ]
    epsilon = split_threshold(model, batches, args.split_unit + 2 * rank)  # process r exits deeper than r - 1
    settings = {
        "full depth": {"exit_policy": "none"},
        f"halting {epsilon:.4f}": {"exit_policy": "halting", "exit_threshold": epsilon},
    }

    def run(setting: dict) -> None:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, **setting)

    seconds = interleaved_seconds({name: lambda s=setting: run(s) for name, setting in settings.items()}, args.repeats)
    rows = []
    for name, setting in settings.items():
        calls[0] = 0
        with torch.no_grad():
            layers = torch.stack([model(input_ids=ids, **setting).executed_layers for ids in batches]).float()
        rows.append(
            {
                "rank": rank,
                "setting": name,
                "seconds_per_batch": seconds[name] / args.batches,
                "layers_per_sample": float(layers.mean()),
                "blocks_needed_per_batch": float(layers.amax(1).mean()),
                "blocks_run_per_batch": calls[0] / args.batches,
            }
        )
    gathered = [None] * args.processes
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        out.write_text(json.dumps([row for rank_rows in gathered for row in rank_rows]))
    dist.destroy_process_group()


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with its seconds as a ratio to the same process's full-depth row."""
    full = {row["rank"]: row["seconds_per_batch"] for row in rows if row["setting"] == "full depth"}
    return [{**row, "ratio_to_full_depth": row["seconds_per_batch"] / full[row["rank"]]} for row in rows]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "sharded_fsdp2_cpu")
    parser.set_defaults(threads=1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="batches per process")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument(
        "--split_unit",
        type=int,
        default=1,
        help="process r's halting epsilon stops half its samples after unit split_unit + 2r",
    )
    args = parse_benchmark_args(parser, argv)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        mp.spawn(measure_rank, args=(free_port(), args, out), nprocs=args.processes)
        rows = with_ratios(json.loads(out.read_text()))
    payload = {
        "benchmark": "sharded exits",
        "sharding": "FSDP2 fully_shard per block, then the root; gloo",
        "backbone": BACKBONE,
        "processes": args.processes,
        "batches_per_process": args.batches,
        "batch_size": args.batch_size,
        "length": args.length,
    }
    return write_results(args.name, payload, rows, results_dir=args.results_dir)


if __name__ == "__main__":
    print(main())
