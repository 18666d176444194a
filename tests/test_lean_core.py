"""The core package works with only its core dependencies (torch, transformers, accelerate, safetensors,
huggingface_hub, numpy): what the extras bring (datasets, evaluate, scikit-learn, scipy, pillow, matplotlib, peft,
onnx) is hidden, and a model is built, saved, loaded through the Auto classes, run, calibrated, fitted, trained and
used to generate."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every finder of `sys.meta_path` is wrapped to find none of the optional packages, so that both `import scipy` and
# `importlib.util.find_spec("scipy")` (Transformers' availability check) answer as where they are not installed.
LEAN_SCRIPT = textwrap.dedent("""
    import importlib.util
    import sys

    OPTIONAL = {"datasets", "evaluate", "sklearn", "scipy", "PIL", "matplotlib", "peft", "onnx", "onnxruntime",
                "adnet_examples"}

    class WithoutOptional:
        def __init__(self, finder):
            self.finder = finder

        def __getattr__(self, name):
            return getattr(self.finder, name)

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in OPTIONAL:
                return None
            return self.finder.find_spec(name, path, target)

    sys.meta_path[:] = [WithoutOptional(finder) for finder in sys.meta_path]
    assert importlib.util.find_spec("scipy") is None
    try:
        import sklearn
        raise AssertionError("sklearn is still importable")
    except ModuleNotFoundError:
        pass

    import numpy as np
    import torch
    from transformers import BertConfig, EvalPrediction

    from adnet_hf import ADNetConfig, ADNetForSequenceClassification, calibrate_exit, compute_classification_metrics
    from adnet_hf import task_metrics

    torch.manual_seed(0)
    backbone = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=64)
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=backbone, num_labels=2, unit_hidden_size=8,
                                                       num_fixed_steps=0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 49).long()}
               for ids in torch.randint(3, 99, (4, 8, 7))]
    result = calibrate_exit(model, batches, policy="halting", budget=0.1, delta=0.1)
    assert result.guarantee["calibration_size"] == 32
    assert all(0 <= candidate["p_value"] <= 1 for candidate in result.candidates)
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    metrics = compute_classification_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 0])))
    assert metrics == {"accuracy": 2 / 3, "f1": 2 / 3}
    rng = np.random.default_rng(0)
    assert set(task_metrics(rng.normal(size=(8, 1)), rng.normal(size=8))) == {"pearson", "spearman", "mse"}
    assert set(task_metrics(rng.normal(size=(8, 3)), rng.random((8, 3)))) == {"accuracy", "micro_f1"}
    # save, load through the Auto classes, exits
    import tempfile

    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, LlamaConfig,
                              TrainingArguments)

    from adnet_hf import ADNetForCausalLM, ADNetTrainer, fit_halting

    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert fit_halting(loaded, batches).samples == 32
    # train two steps with the Trainer route
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": (i[0] > 49).long()}
            for batch in batches for i in batch["input_ids"]]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, save_strategy="no")
    ADNetTrainer(model=loaded.train(), args=args, train_dataset=rows).train()
    # causal LMs: save, load, generate at full depth and with self-speculative decoding
    for backbone in (GPT2Config(vocab_size=99, n_embd=32, n_layer=4, n_head=4, n_positions=64),
                     LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64)):
        lm = ADNetForCausalLM(ADNetConfig(backbone_config=backbone, unit_hidden_size=8))
        folder = tempfile.mkdtemp()
        lm.save_pretrained(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, exit_policy="none").eval()  # drafts verify at full depth
        prompt = torch.randint(3, 99, (1, 5))
        plain = lm.generate(prompt, max_new_tokens=4, do_sample=False)
        drafted = lm.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, assistant_early_exit=2)
        assert torch.equal(plain, drafted), (plain, drafted)
    imported = sorted(name for name in sys.modules if name.partition(".")[0] in OPTIONAL)
    assert not imported, imported
    print("lean ok")
""")


@pytest.mark.slow
def test_the_core_runs_without_the_optional_packages(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", LEAN_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lean ok" in result.stdout
