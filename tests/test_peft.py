"""LoRA (PEFT) on ADNet: the adapters sit on the backbone's blocks, the units and heads train fully, the adapter saves
and loads with them, merging keeps the outputs, and exits still skip blocks."""

import json
import math
import re

import pytest
import torch
from conftest import (
    bert_config,
    gpt2_config,
    image_model,
    lm_model,
    midpoint_threshold,
    seq_model,
    spread_halting,
    text_metrics,
    token_batch,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_run_glue_style import FAST, TINY_BERT, sst2_rows, write_tsv
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertModel,
    BertTokenizer,
    TrainingArguments,
)
from transformers.testing_utils import CaptureLogger

from adnet_hf import ADNetConfig, ADNetForCausalLM, ADNetForSequenceClassification
from adnet_hf.peft_adnet import adnet_lora_config, adnet_trained_modules, lora_target_modules
from adnet_hf.trainer_adnet import ADNetTrainer, ADNetTrainingArguments
from adnet_hf.trainer_adnet import logger as trainer_logger
from benchmarks import bench_lora
from examples import run_glue_style

NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def classifier(seed=0):
    torch.manual_seed(seed)
    config = ADNetConfig(
        backbone_config=bert_config(**NO_DROPOUT["bert"]), num_labels=3, unit_hidden_size=8, classifier_dropout=0.0
    )
    return ADNetForSequenceClassification(config)


def causal_lm(seed=0):
    torch.manual_seed(seed)
    return ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(**NO_DROPOUT["gpt2"]), unit_hidden_size=8))


def dataset(causal: bool, size=16):
    ids, mask = token_batch(batch=size, pad_lengths=[0, 2, 0, 3] * (size // 4))
    labels = ids.masked_fill(mask == 0, -100) if causal else torch.arange(size) % 3
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(size)]


def outputs(model, ids, mask, **exit_setting):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **exit_setting)


def assert_same_outputs(model, other, ids, mask, atol=1e-5):
    """Equal logits at full depth and with exits, and the same exits."""
    for setting in ({"exit_policy": "none"}, {"exit_policy": "halting", "exit_threshold": 0.5}):
        expected, actual = outputs(model, ids, mask, **setting), outputs(other, ids, mask, **setting)
        torch.testing.assert_close(actual.logits, expected.logits, atol=atol, rtol=0)
        assert torch.equal(actual.exit_steps, expected.exit_steps)


BLOCK_LAYERS = {
    "bert": {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    },
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
}


@pytest.mark.parametrize("backbone", list(BLOCK_LAYERS))
def test_lora_targets_the_blocks_and_trains_units_and_heads(backbone):
    model = lm_model("llama") if backbone == "llama" else seq_model(backbone)
    targets = lora_target_modules(model)
    assert len(targets) == len(BLOCK_LAYERS[backbone]) * model.config.num_blocks
    assert all(name.startswith("adnet.backbone.") for name in targets)
    assert {re.sub(r"^.*?\.\d+\.", "", name) for name in targets} == BLOCK_LAYERS[backbone]

    peft_model = get_peft_model(model, adnet_lora_config(model, r=2))
    trainable = {
        name.removeprefix("base_model.model.") for name, param in peft_model.named_parameters() if param.requires_grad
    }
    assert {name.split(".lora_")[0] for name in trainable if ".lora_" in name} == set(targets)
    fully_trained = {name.split(".modules_to_save")[0] for name in trainable if ".lora_" not in name}
    assert fully_trained == set(adnet_trained_modules(model))
    units = {f"adnet.units.{n}" for n, unit in enumerate(model.adnet.units) if any(True for _ in unit.parameters())}
    heads = {f"output_layers.{n}" for n in range(len(getattr(model, "output_layers", ())))}
    assert fully_trained == units | heads  # the last per-token unit of a causal LM has no weights; its LM head stays


def test_target_module_names_pick_layers_of_the_blocks_only():
    model = seq_model("bert")
    targets = lora_target_modules(model, ["query", "value"])
    assert len(targets) == 2 * model.config.num_blocks
    assert all(name.endswith((".attention.self.query", ".attention.self.value")) for name in targets)
    assert not any("units" in name for name in lora_target_modules(model, ["dense"]))  # units have `dense` too
    with pytest.raises(ValueError, match="match no linear layer.*query"):
        lora_target_modules(model, ["q_proj"])
    with pytest.raises(ValueError, match="modules_to_save is set by adnet_lora_config"):
        adnet_lora_config(model, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="ResNet"):
        lora_target_modules(image_model())
    with pytest.raises(TypeError, match="ADNet model"):
        lora_target_modules(BertModel(bert_config()))


@pytest.mark.parametrize(
    "model_fn", [classifier, pytest.param(causal_lm, marks=pytest.mark.slow)], ids=["bert_classifier", "gpt2_causal_lm"]
)
def test_lora_trains_saves_loads_and_merges(tmp_path, model_fn):
    causal = model_fn is causal_lm
    model = model_fn()
    ids, mask = token_batch(batch=8, pad_lengths=[0, 2, 0, 3] * 2)
    before = outputs(model, ids, mask, exit_policy="none").logits
    peft_model = get_peft_model(model, adnet_lora_config(model, r=4, lora_alpha=8))
    args = ADNetTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        report_to="none",
        seed=0,
        max_steps=3,
        learning_rate=1e-2,
        unit_learning_rate=1e-2,
    )
    ADNetTrainer(model=peft_model, args=args, train_dataset=dataset(causal)).train()
    trained = outputs(peft_model, ids, mask, exit_policy="none").logits
    assert not torch.allclose(trained, before)
    with peft_model.disable_adapter():  # the backbone and the units' and heads' originals did not move
        torch.testing.assert_close(outputs(peft_model, ids, mask, exit_policy="none").logits, before, rtol=0, atol=0)
    assert all(param.abs().sum() > 0 for name, param in peft_model.named_parameters() if "lora_B" in name)

    peft_model.save_pretrained(tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in key for key in weights) and any(".units.0." in key for key in weights)
    loaded = PeftModel.from_pretrained(model_fn(), tmp_path / "adapter")
    assert_same_outputs(peft_model, loaded, ids, mask, atol=0.0)

    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model) and not any("lora" in name for name, _ in merged.named_parameters())
    assert_same_outputs(loaded, merged, ids, mask)
    merged.save_pretrained(tmp_path / "merged")
    auto_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    assert_same_outputs(merged, auto_class.from_pretrained(tmp_path / "merged"), ids, mask, atol=0.0)


def count_block_rows(model) -> list[int]:
    """Hooks on the backbone's blocks: how many samples each block call ran on."""
    adnet = model.get_base_model().base_model if isinstance(model, PeftModel) else model.base_model
    rows = []
    for block in adnet.adapter.blocks(adnet.backbone):
        block.register_forward_hook(lambda _module, args, _output: rows.append(args[0].shape[0]))
    return rows


def test_exits_skip_blocks_with_adapters_attached():
    model = classifier()
    spread_halting(model)
    peft_model = get_peft_model(model, adnet_lora_config(model, r=4, init_lora_weights=False))  # random B: LoRA acts
    ids, mask = token_batch(batch=8, pad_lengths=[0, 2, 0, 3] * 2)
    full_depth = outputs(peft_model, ids, mask, exit_policy="none", output_step_logits=True)
    epsilon = midpoint_threshold(1.0 - full_depth.halting_probs[:, 0])  # about half the samples stop at once
    rows = count_block_rows(peft_model)
    with_adapters = outputs(peft_model, ids, mask, exit_policy="halting", exit_threshold=epsilon)
    executed = with_adapters.executed_layers
    assert executed.min() < executed.max()
    assert sum(rows) == executed.sum() < len(ids) * model.config.num_blocks  # blocks ran for active samples only
    with peft_model.disable_adapter():
        assert not torch.allclose(outputs(peft_model, ids, mask, exit_policy="none").logits, full_depth.logits)


def test_trainer_warns_when_peft_freezes_the_units(tmp_path):
    from peft import LoraConfig

    model = classifier()
    frozen_units = get_peft_model(model, LoraConfig(target_modules=["query", "value"], r=2))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with CaptureLogger(trainer_logger) as captured:
        ADNetTrainer(model=frozen_units, args=args)
    assert "calculation units are frozen" in captured.out
    model = classifier()
    with CaptureLogger(trainer_logger) as captured:
        ADNetTrainer(model=get_peft_model(model, adnet_lora_config(model, r=2)), args=args)
    assert "frozen" not in captured.out


def test_lora_rank_and_learning_rate_groups(tmp_path):
    model = classifier()
    peft_model = get_peft_model(model, adnet_lora_config(model, r=2))
    args = ADNetTrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        learning_rate=1e-3,
        unit_learning_rate=1e-2,
        output_learning_rate=1e-1,
    )
    trainer = ADNetTrainer(model=peft_model, args=args)
    groups = {
        (group["name"], id(param)): group["lr"]
        for group in trainer.create_optimizer().param_groups
        for param in group["params"]
    }
    names = {id(param): name for name, param in peft_model.named_parameters()}
    for (group, param_id), lr in groups.items():
        name = names[param_id]
        expected = ("backbone", 1e-3) if ".lora_" in name else ("unit", 1e-2) if ".units." in name else ("output", 1e-1)
        assert (group, lr) == expected, name
    assert len(groups) == sum(p.requires_grad for p in peft_model.parameters())


def test_step_time_benchmark_times_both_arms(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "backbone")
    BertModel(bert_config()).save_pretrained(tmp_path / "backbone")
    rows = ["sentence\tlabel"] + [f"w{i} w{i + 1} w{(i * 7) % 90}\t{i % 2}" for i in range(8)]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    path = bench_lora.main(
        [
            "--backbone",
            str(tmp_path / "backbone"),
            "--data",
            str(tmp_path / "dev.tsv"),
            "--train_batches",
            "2",
            "--batch_size",
            "4",
            "--repeats",
            "1",
            "--lora_r",
            "2",
            "--threads",
            "1",
            "--results_dir",
            str(tmp_path / "results"),
        ]
    )
    full, lora = json.loads(path.read_text())["rows"]
    assert (full["setting"], lora["setting"]) == ("full fine-tuning", "LoRA r=2")
    assert full["ratio_to_full_fine_tuning"] == 1.0 and math.isfinite(lora["ratio_to_full_fine_tuning"])
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"]


@pytest.mark.slow
def test_glue_script_with_lora_saves_a_merged_adnet_checkpoint(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sst2_rows("train", 32))
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sst2_rows("dev", 16))
    out = tmp_path / "out"
    metrics = run_glue_style.main(
        [
            "--backbone_config",
            json.dumps(TINY_BERT),
            "--train_file",
            train,
            "--validation_file",
            dev,
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--num_train_epochs",
            "1",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "query",
            "value",
            *FAST,
        ]
    )
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)  # a plain ADNet checkpoint: merged
    assert model.config.model_type == "adnet" and not any("lora" in name for name, _ in model.named_parameters())
    assert text_metrics(out, dev, 16)["accuracy"] == metrics["eval_accuracy"]
    trained = json.loads((out / "train_results.json").read_text())["trainable_parameters"]
    lora = 2 * 2 * 4 * TINY_BERT["hidden_size"] * TINY_BERT["num_hidden_layers"]  # A and B of query and value
    units_and_heads = sum(p.numel() for m in (*model.adnet.units, *model.output_layers) for p in m.parameters())
    assert trained == lora + units_and_heads
    refusals = {"--plain_baseline": "--lora_r adapts an ADNet model", "--freeze_full_depth": "choose one"}
    for flag, refusal in refusals.items():
        with pytest.raises(ValueError, match=refusal):
            run_glue_style.main(
                [
                    flag,
                    "--backbone_config",
                    json.dumps(TINY_BERT),
                    "--train_file",
                    train,
                    "--output_dir",
                    str(tmp_path / "refused"),
                    "--do_train",
                    "--lora_r",
                    "4",
                    *FAST,
                ]
            )
