"""Exits on sharded blocks (`sharding_adnet`): processes whose samples exit at different depths stay in step.

The quick tests drive the synchronised pass in one process, as if another process still ran; the slow ones run
`sharded_worker.py` on two CPU processes (gloo) per wrapping, under a short process-group timeout and a hard
subprocess timeout, so that a desynchronised collective fails the test instead of hanging it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import seq_model, spread_halting, token_batch
from test_distributed import free_port

from adnet_hf import modeling_adnet, sharding_adnet
from adnet_hf.sharding_adnet import LocalExits, ShardedExits, blocks_are_sharded, exit_sync

TESTS = Path(__file__).resolve().parent
PROCESS_GROUP_TIMEOUT_S, RUN_TIMEOUT_S = 60, 300


def spread_model():
    model = seq_model()
    spread_halting(model)
    return model.eval()


def test_one_process_never_synchronises(monkeypatch):
    """No process group: exits are local even when asked to synchronise, and no collective is issued."""
    monkeypatch.setattr(sharding_adnet, "any_process", lambda *args: pytest.fail("a collective was issued"))
    model = spread_model()
    model.base_model.sync_exits = True
    assert type(exit_sync([[model.base_model.backbone.encoder.layer[0]]], True)) is LocalExits
    ids, mask = token_batch()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, exit_policy="halting", exit_threshold=0.5).exit_steps.min() < 4


def test_plain_and_zero3_blocks_are_detected():
    model = spread_model()
    blocks = list(model.base_model.backbone.encoder.layer)
    assert not blocks_are_sharded(blocks)
    blocks[2].attention.self.query.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert blocks_are_sharded(blocks)


def test_a_finished_process_runs_every_step_on_a_stand_in_and_gives_the_same_outputs(monkeypatch):
    """As if another process still ran: the loop goes to the last step, a process with no sample left runs the
    blocks on a one-sample stand-in, and nothing it computes reaches the outputs."""
    model = spread_model()
    ids, mask = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, exit_policy="halting", exit_threshold=0.5)
    stand_ins = []

    class Recording(ShardedExits):
        def stand_in(self, run):
            stand_ins.append(self.placeholder.hidden.shape[0])
            super().stand_in(run)

    monkeypatch.setattr(modeling_adnet, "exit_sync", lambda steps, sync_exits: Recording())
    monkeypatch.setattr(sharding_adnet, "any_process", lambda flag, device: True)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, exit_policy="halting", exit_threshold=0.5, output_hidden_states=True
        )
    last = int(expected.exit_steps.max())
    assert last < 4 and stand_ins == [1] * (4 - last)  # one stand-in per step after the last exit
    for name in ("logits", "exit_steps", "halting_probs", "flops"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), msg=name)


def run_two_processes(script: Path, *args: str) -> None:
    """`script` on two CPU processes. The launcher's whole process group is killed on timeout."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PG_TIMEOUT": str(PROCESS_GROUP_TIMEOUT_S),
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{script.name} {args} still ran after {RUN_TIMEOUT_S} s")
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "wrapping, synchronised",
    [
        ("fsdp2_blocks", True),
        ("fsdp2_whole", False),
        ("ddp", False),
        ("fsdp1_blocks", True),
    ],
)
def test_two_processes_train_and_exit_as_one(wrapping, synchronised, tmp_path):
    """Full-depth training equals one process; evaluation with every exit policy completes and equals the
    unwrapped model on both processes; the exits synchronise only where the blocks are sharded."""
    run_two_processes(TESTS / "sharded_worker.py", wrapping, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all((report["exit_all_reduces"] > 0) == synchronised for report in reports), reports
