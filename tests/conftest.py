"""Tiny random backbones built from configs, as Transformers' own tests do."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    GPT2Config,
    LlamaConfig,
    ResNetConfig,
    RobertaConfig,
)

from adnet_examples.data import (
    ImageDataset,
    image_batches,
    make_batches,
    model_label_ids,
    read_idx,
    read_tsv,
    saved_image_processor,
)
from adnet_hf import ADNetConfig, ADNetForCausalLM, ADNetForImageClassification, ADNetForSequenceClassification
from adnet_hf.evaluation_adnet import evaluate_batches
from benchmarks.bench_classification import plain_quality, with_labels

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 99
# The project's real data (GLUE, MNIST, PTB, the GPT-2 tokenizer) lies in shared/ beside the checkout.
SHARED_DATA = Path(os.environ.get("ADNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder is not at {SHARED_DATA} (set ADNET_SHARED_DATA)")
    return SHARED_DATA


# A tiny random BERT for the example scripts' `--backbone_config` (they learn a WordPiece vocabulary of up to 200).
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 200,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
}


def bert_config(**kwargs):
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        **kwargs,
    )


def roberta_config(**kwargs):
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=70,
        pad_token_id=1,
        **kwargs,
    )


def gpt2_config(**kwargs):
    defaults = dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2Config(**{**defaults, **kwargs})


def llama_config(**kwargs):
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**defaults, **kwargs})


def resnet_config(**kwargs):
    defaults = dict(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic")
    return ResNetConfig(**{**defaults, **kwargs})


TEXT_BACKBONES = {"bert": bert_config, "roberta": roberta_config, "gpt2": gpt2_config}
DECODER_BACKBONES = {"gpt2": gpt2_config, "llama": llama_config}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Same random weights in every test; one thread, so tiny ops are not slowed by thread contention."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_batch(batch=4, length=7, pad_lengths=(0, 2, 0, 3), left_padding=False, pad_id=0):
    """Random ids (avoiding special ids 0-2) and an attention mask with some padding."""
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pad_lengths[:batch]):
        if pad:
            if left_padding:
                mask[row, :pad] = 0
            else:
                mask[row, length - pad :] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


def spread_halting(model, scale=25.0):
    """Make halting probabilities differ strongly between inputs, so samples exit at different steps: the units
    halt on their summary alone (a random model's step evidence barely differs between inputs; the evidence is
    tested in test_halting_evidence.py)."""
    with torch.no_grad():
        for unit in model.base_model.units[:-1]:
            unit.halting.weight.mul_(scale)
            if unit.reads_evidence:
                unit.evidence.weight.zero_()


def seq_model(backbone="bert", **overrides):
    config = ADNetConfig(backbone_config=TEXT_BACKBONES[backbone](), num_labels=3, unit_hidden_size=8, **overrides)
    return ADNetForSequenceClassification(config)


def image_model(**overrides):
    config = ADNetConfig(backbone_config=resnet_config(), num_labels=10, unit_hidden_size=8, **overrides)
    return ADNetForImageClassification(config)


def lm_model(backbone="gpt2", **overrides):
    config = ADNetConfig(backbone_config=DECODER_BACKBONES[backbone](), unit_hidden_size=8, **overrides)
    return ADNetForCausalLM(config)


def midpoint_threshold(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: about half the samples fall on each side, none on it."""
    ordered = values.sort().values
    middle = len(ordered) // 2
    return float(ordered[middle - 1] + ordered[middle]) / 2


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["adnet_hf"] = None  # the package must not be importable: only the checkpoint's own code loads
    import torch, transformers
    from safetensors.torch import load_file
    path, auto_name = sys.argv[1], sys.argv[2]
    model = getattr(transformers, auto_name).from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("adnet_hf"), type(model).__module__
    data = load_file(path + "/expected.safetensors")
    inputs = {k: v for k, v in data.items() if not k.startswith("expected_")}
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.logits, data["expected_logits"])
    assert torch.equal(out.exit_steps, data["expected_exit_steps"])
    print("remote ok", type(model).__name__)
""")


def assert_loads_as_remote_code(model, inputs: dict, folder: Path, auto_name: str) -> None:
    """The checkpoint in `folder` loads through `auto_name` with `trust_remote_code=True` in a fresh process where
    `adnet_hf` cannot be imported, and gives `model`'s logits and exit steps on `inputs`."""
    with torch.no_grad():
        out = model(**inputs)
    save_file(
        {**inputs, "expected_logits": out.logits, "expected_exit_steps": out.exit_steps},
        str(folder / "expected.safetensors"),
    )
    run_as_remote_code(REMOTE_SCRIPT, folder, auto_name)


def run_as_remote_code(script: str, folder: Path, *args: str) -> None:
    """Run `script` (which prints "remote ok") on the checkpoint in `folder` (its first argument, then `args`) in a
    fresh offline process, with the checkpoint's own modules cache and without this checkout on the path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": f"{folder}_modules", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def vary_token_exits(model, halting_epsilon=0.7):
    """Random per-token halting in a causal LM (whose tiny random backbone otherwise exits every token at one step)."""
    model.config.halting_epsilon = halting_epsilon
    with torch.no_grad():
        for unit in model.base_model.units[:-1]:
            unit.dense.weight.normal_(0.0, 1.0)
            unit.halting.weight.normal_(0.0, 3.0)
            unit.halting.bias.zero_()


# Re-evaluating what the example scripts save: the reference their reported metrics are checked against. The data
# is batched as the scripts' evaluation batches it (in order, padded per batch), so the numbers agree exactly.


def saved_model_metrics(model, batches: list[dict], labels: torch.Tensor, **exit_setting) -> dict[str, float]:
    """`evaluate_batches` of an ADNet model (with `exit_setting`), the task metrics of a plain one."""
    if model.config.model_type == "adnet":
        return evaluate_batches(model.eval(), with_labels(batches, labels), **exit_setting)
    return plain_quality(model.eval(), batches, labels)


def text_metrics(folder: Path, tsv: Path, batch_size: int, max_length: int = 32, **exit_setting) -> dict[str, float]:
    """The metrics of the text classifier (or regressor) saved in `folder` on a GLUE-style TSV."""
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    texts, labels = read_tsv(Path(tsv))
    batches = make_batches(AutoTokenizer.from_pretrained(folder), texts, batch_size, max_length)
    return saved_model_metrics(model, batches, model_label_ids(labels, model.config, str(tsv)), **exit_setting)


def image_metrics(folder: Path, images: Path, labels: Path, limit: int, batch_size: int) -> dict[str, float]:
    """The metrics of the image classifier saved in `folder` on the first `limit` IDX images, through its saved image
    processor."""
    dataset = ImageDataset(read_idx(str(images)), read_idx(str(labels)), limit, saved_image_processor(str(folder)))
    model = AutoModelForImageClassification.from_pretrained(folder)
    return saved_model_metrics(model, image_batches(dataset, batch_size), dataset.labels)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(vocab=str(tmp_path / "vocab.txt"))  # v5: `vocab`, not `vocab_file`
    model = ADNetForSequenceClassification(
        ADNetConfig(backbone_config=bert_config(), num_labels=2, unit_hidden_size=8, num_fixed_steps=0)
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = ["sentence\tlabel"] + [f"w{i} w{i + 1} w{(i * 7) % 90}\t{i % 2}" for i in range(12)]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path
