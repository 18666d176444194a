"""One process of `test_sharded_exits`: `torchrun --nproc_per_node=2 tests/sharded_worker.py WRAPPING FOLDER`.

Each process builds the same tiny BERT ADNet classifier, wraps a copy as WRAPPING (`ddp`, `fsdp2_whole`,
`fsdp2_blocks`, `fsdp1_blocks`) and checks, against the unwrapped model in the same process:
- training at full depth: a few optimiser steps on this process's half of a global batch give the weights one
  process gets on the whole batch;
- evaluation with exits, for every exit policy, over batches whose samples all exit early on one process and late
  on the other (and the reverse, and mixed): it completes, with the unwrapped model's logits and exit steps.
Writes FOLDER/rank<r>.json: how many exit-synchronising all-reduces were issued.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import bert_config, midpoint_threshold, spread_halting, token_batch
from torch.nn.parallel import DistributedDataParallel

from adnet_hf import ADNetConfig, ADNetForSequenceClassification, sharding_adnet

GLOBAL_BATCH, TRAIN_STEPS, POOL = 8, 3, 32


def tiny_classifier() -> ADNetForSequenceClassification:
    """Dropout-free (masks would differ between processes), with halting, confidence and predictions that differ
    strongly between inputs and steps, so that each exit policy stops samples at different steps."""
    torch.manual_seed(0)
    backbone = bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ADNetForSequenceClassification(
        ADNetConfig(backbone_config=backbone, num_labels=3, unit_hidden_size=8, classifier_dropout=0.0)
    )
    spread_halting(model)
    with torch.no_grad():
        for layer in [*(unit.dense for unit in model.base_model.units), model.output_layers[0][1]]:
            layer.weight.normal_(0.0, 1.0)
    return model


def wrap(model: torch.nn.Module, wrapping: str) -> torch.nn.Module:
    """`model` sharded (or replicated) across the processes as `wrapping` says."""
    blocks = model.base_model.backbone.encoder.layer
    if wrapping == "ddp":
        return DistributedDataParallel(model)
    if wrapping.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        if wrapping == "fsdp2_blocks":
            for block in blocks:
                fully_shard(block)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}), device_id=torch.device("cpu"), use_orig_params=True
    )


def full_weights(model: torch.nn.Module, wrapping: str) -> dict[str, torch.Tensor]:
    if wrapping.startswith("fsdp1"):
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        config = FullStateDictConfig(rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            state = model.state_dict()
    else:
        state = model.state_dict()
    return {
        name.removeprefix("module."): value.full_tensor() if hasattr(value, "full_tensor") else value
        for name, value in state.items()
    }


def check_training(model: ADNetForSequenceClassification, wrapping: str, rank: int) -> None:
    reference, sharded = copy.deepcopy(model).train(), wrap(copy.deepcopy(model), wrapping).train()
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, sharded)]
    half = GLOBAL_BATCH // dist.get_world_size()
    for step in range(TRAIN_STEPS):
        ids, mask = token_batch(GLOBAL_BATCH, 7, (0, 2, 0, 3, 1, 0, 4, 0))
        labels = torch.randint(0, 3, (GLOBAL_BATCH,))
        mine = slice(rank * half, (rank + 1) * half)
        for m, optimiser, part in zip((reference, sharded), optimisers, (slice(None), mine)):
            optimiser.zero_grad()
            m(input_ids=ids[part], attention_mask=mask[part], labels=labels[part]).loss.backward()
            optimiser.step()
    trained = full_weights(sharded, wrapping)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(trained["adnet.units.0.halting.weight"], model.state_dict()["adnet.units.0.halting.weight"])


def exit_settings(model: ADNetForSequenceClassification, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """A setting per exit policy that splits the pool into early and late exits."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True)
    first_confidence = out.step_logits[0].softmax(-1).max(-1).values
    return {
        "halting": midpoint_threshold(1 - out.halting_probs[:, :2].sum(-1)),
        "confidence": midpoint_threshold(first_confidence),
        "patience": 1,
    }


def diverging_batches(exit_steps: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Pool indices of this process's batches: all early here and all late there, the reverse, then mixed."""
    cut = max(
        range(int(exit_steps.min()), int(exit_steps.max())),
        key=lambda step: min((exit_steps <= step).sum(), (exit_steps > step).sum()),
    )
    early, late = (exit_steps <= cut).nonzero().squeeze(-1), (exit_steps > cut).nonzero().squeeze(-1)
    assert len(early) >= 4 and len(late) >= 4, exit_steps
    order = (early, late) if rank == 0 else (late, early)
    return [order[0][:2], order[1][2:4], torch.stack([early[rank], late[rank]])]


def check_evaluation(model: ADNetForSequenceClassification, wrapping: str, rank: int) -> None:
    reference, sharded = model.eval(), wrap(copy.deepcopy(model), wrapping).eval()
    torch.manual_seed(1)
    ids, mask = token_batch(POOL, 8, [i % 4 for i in range(POOL)])
    for policy, threshold in exit_settings(reference, ids, mask).items():
        setting = {"exit_policy": policy, "exit_threshold": threshold}
        with torch.no_grad():
            pool_steps = reference(input_ids=ids, attention_mask=mask, **setting).exit_steps
            for batch in diverging_batches(pool_steps, rank):
                expected = reference(input_ids=ids[batch], attention_mask=mask[batch], **setting)
                out = sharded(input_ids=ids[batch], attention_mask=mask[batch], **setting)
                assert torch.equal(out.exit_steps, expected.exit_steps), (policy, out.exit_steps, expected.exit_steps)
                torch.testing.assert_close(out.logits, expected.logits, msg=policy)


def main(wrapping: str, folder: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("PG_TIMEOUT", "60"))))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    calls = []
    any_process = sharding_adnet.any_process
    sharding_adnet.any_process = lambda flag, device: calls.append(flag) or any_process(flag, device)
    model = tiny_classifier()
    check_training(model, wrapping, rank)
    check_evaluation(model, wrapping, rank)
    (folder / f"rank{rank}.json").write_text(json.dumps({"wrapping": wrapping, "exit_all_reduces": len(calls)}))
    dist.barrier()  # no process tears gloo down while its peer still has a collective in flight
    dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """Exit without interpreter finalisation. Gloo's process group outlives `destroy_process_group` here (still
    referenced, most likely by the wrapped copies' reference cycles), and freeing it during finalisation aborted about
    one run in 40 ("terminate called without an active exception", after `atexit` had run and both results were
    written; torch 2.13, CPU). The checks are done and their results closed by then, so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
