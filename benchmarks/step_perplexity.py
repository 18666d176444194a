"""How well each step of an ADNet causal LM predicts on its own: the perplexity of every exit point at full depth.

An exit can only be as good as the prediction at its step (the backbone's final norm and tied LM head applied to
that step's hidden state), its perplexity pooled over every predicted token by `adnet_hf.evaluation_adnet`. This is
the ceiling of what any exit policy can keep. Each row also gives how often the step's most likely next token is
the last step's (`agreement_with_last_step`): the share of greedy drafts from that exit the full model would accept
on this text. No timing, so it runs beside anything.

    python -m benchmarks.step_perplexity --model outputs/ptb-smollm2-adnet --data data/ptb/ptb.test.txt \
        --block_size 128 --max_blocks 16 --name ptb_smollm2_steps
"""

from __future__ import annotations

from pathlib import Path

import torch

from adnet_hf.evaluation_adnet import perplexity, token_losses
from adnet_hf.exits_adnet import FULL_DEPTH

from .bench_generation import add_text_arguments, load_text_inputs
from .common import benchmark_parser, parse_benchmark_args, variable_step_layers, write_results


@torch.inference_mode()
def step_perplexities(model, blocks: torch.Tensor, batch_size: int) -> tuple[list[float], list[float]]:
    """The perplexity of each variable step's prediction over every predicted token of `blocks`, at full depth, and
    the share of those tokens where the step's argmax is the last step's."""
    losses: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_variable_steps)]
    agreements: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_variable_steps)]
    for batch in blocks.split(batch_size):
        out = model(input_ids=batch, exit_policy=FULL_DEPTH, output_step_logits=True)
        final = out.step_logits[-1][:, :-1].argmax(-1)
        for step, agreement, logits in zip(losses, agreements, out.step_logits):
            step.append(token_losses(logits, batch))
            agreement.append((logits[:, :-1].argmax(-1) == final).flatten())
    return (
        [perplexity(torch.cat(step)) for step in losses],
        [torch.cat(agreement).float().mean().item() for agreement in agreements],
    )


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "step_perplexity")
    add_text_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=2, help="small: every step's logits are kept")
    args = parse_benchmark_args(parser, argv)
    model, blocks = load_text_inputs(args)
    config = model.config
    perplexities, agreements = step_perplexities(model, blocks, args.batch_size)
    rows = [
        {
            "executed_layers": layers,
            "perplexity": ppl,
            "ratio_to_last_step": ppl / perplexities[-1],
            "agreement_with_last_step": agreement,
        }
        for layers, ppl, agreement in zip(variable_step_layers(config), perplexities, agreements)
    ]
    payload = {
        "benchmark": "step_perplexity",
        "model": args.model,
        "data": args.data,
        "blocks": len(blocks),
        "block_size": args.block_size,
        "num_blocks": config.num_blocks,
    }
    return write_results(args.name, payload, rows, None, args.results_dir)


if __name__ == "__main__":
    print(main())
