"""What every Transformers model does, checked on every ADNet head, at full depth and with exits.

After Transformers' own common tests (`ModelTesterMixin`): outputs as dict or tuple, output flags from the config,
hidden states and attentions with the backbone's layout, gradient checkpointing, static caches, the config
attributes utilities read, loss scaling under gradient accumulation through `Trainer` and `ADNetTrainer`. Where
early exit changes a convention, the documented behaviour is asserted instead (see `ADNetModelOutput`).
"""

from dataclasses import fields, make_dataclass

import pytest
import torch
from accelerate import init_empty_weights
from conftest import (
    bert_config,
    gpt2_config,
    llama_config,
    midpoint_threshold,
    resnet_config,
    roberta_config,
    spread_halting,
    token_batch,
)
from transformers import AutoModel, Trainer, TrainingArguments
from transformers.modeling_outputs import ModelOutput

from adnet_hf import (
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetModel,
)
from adnet_hf.modeling_adnet import ADNetCausalLMOutput, ADNetModelOutput, ADNetSequenceClassifierOutput
from adnet_hf.trainer_adnet import ADNetTrainer, ADNetTrainingArguments

NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}
# head name -> (model class, backbone config, input kind)
HEADS = {
    "bert-sequence": (ADNetForSequenceClassification, lambda: bert_config(**NO_DROPOUT["bert"]), "text"),
    "roberta-sequence": (ADNetForSequenceClassification, lambda: roberta_config(**NO_DROPOUT["bert"]), "text"),
    "gpt2-sequence": (ADNetForSequenceClassification, lambda: gpt2_config(**NO_DROPOUT["gpt2"]), "text"),
    "gpt2-causal": (ADNetForCausalLM, lambda: gpt2_config(**NO_DROPOUT["gpt2"]), "causal"),
    "llama-causal": (ADNetForCausalLM, llama_config, "causal"),
    "resnet-image": (ADNetForImageClassification, resnet_config, "image"),
}
TEXT_HEADS = [name for name, (_, _, kind) in HEADS.items() if kind != "image"]
CAUSAL_HEADS = [name for name, (_, _, kind) in HEADS.items() if kind == "causal"]


def build(head: str, **overrides):
    model_class, backbone, _ = HEADS[head]
    config = ADNetConfig(
        backbone_config=backbone(),
        num_labels=3,
        unit_hidden_size=8,
        num_fixed_steps=0,
        classifier_dropout=0.0,
        attn_implementation="eager",
        **overrides,
    )
    return model_class(config)


def inputs_for(head: str, batch: int = 4, labels: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    kind = HEADS[head][2]
    if kind == "image":
        inputs = {"pixel_values": torch.randn(batch, 1, 28, 28)}
    else:
        ids, mask = token_batch(
            batch=batch, pad_lengths=(0, 2, 0, 3) * (batch // 4), pad_id=1 if head.startswith("roberta") else 0
        )
        inputs = {"input_ids": ids, "attention_mask": mask}
    if labels:
        inputs["labels"] = (
            inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            if kind == "causal"
            else torch.randint(0, 3, (batch,))
        )
    return inputs


def exiting_model(head: str, **overrides):
    """The head in eval mode, and a `halting` threshold under which some items exit at the first unit and not
    others."""
    model = build(head, **overrides).eval()
    spread_halting(model, scale=5.0 if HEADS[head][2] == "causal" else 200.0)
    inputs = inputs_for(head, labels=False)
    with torch.no_grad():
        first = model(**inputs, exit_policy="none", output_step_logits=True).halting_probs[..., 0]
    real = first[inputs["attention_mask"].bool()] if HEADS[head][2] == "causal" else first
    return model, midpoint_threshold(1 - real.flatten())


SETTINGS = [("none", False), ("halting", True)]


@pytest.mark.parametrize("policy,exits", SETTINGS, ids=["full_depth", "exits"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_return_dict_false_gives_the_tuple_loss_first(head, policy, exits):
    model, threshold = exiting_model(head)
    kwargs = {"exit_policy": policy, "exit_threshold": threshold if exits else None}
    inputs = inputs_for(head)
    with torch.no_grad():
        as_dict = model(**inputs, **kwargs)
        as_tuple = model(**inputs, **kwargs, return_dict=False)
        model.config.return_dict = False
        from_config = model(**inputs, **kwargs)
    expected = as_dict.to_tuple()
    for result in (as_tuple, from_config):
        assert isinstance(result, tuple) and len(result) == len(expected)
        assert torch.equal(result[0], as_dict.loss) and torch.equal(result[1], as_dict.logits)
        for ours, theirs in zip(result[2:], expected[2:]):
            assert type(ours) is type(theirs)


@pytest.mark.parametrize("output_class", [ADNetModelOutput, ADNetSequenceClassifierOutput, ADNetCausalLMOutput])
def test_outputs_behave_as_model_outputs_of_the_same_fields(output_class):
    """ADNet's outputs write fields without `ModelOutput.__setattr__` (`ADNetOutput`): keys, order, tuple, item and
    attribute access after every kind of write are a plain `ModelOutput`'s."""
    plain_class = make_dataclass(
        "Plain", [(f.name, f.type, f.default) for f in fields(output_class)], bases=(ModelOutput,)
    )
    names = [f.name for f in fields(output_class)]
    values = {name: torch.full((1,), float(i)) for i, name in enumerate(names)}
    given = {name: values[name] for name in names[1::2]}
    ours, theirs = output_class(**given), plain_class(**given)
    writes = [(names[0], values[names[0]]), (names[1], None), (names[2], values[names[2]]), ("extra", 1)]
    if "cache" in names:  # the legacy name, which `ModelOutput` renames
        writes.append(("past_key_values", "a cache"))
    for name, value in writes:
        setattr(ours, name, value)
        setattr(theirs, name, value)
        assert list(ours.keys()) == list(theirs.keys())
        assert [id(v) for v in ours.to_tuple()] == [id(v) for v in theirs.to_tuple()]
        assert all(getattr(ours, n) is getattr(theirs, n) for n in names)
    assert ours[0] is theirs[0] and ours.extra == theirs.extra == 1 and "extra" not in ours


def backbone_outputs(model, inputs: dict):
    """The backbone's own hidden states and attentions on the same inputs (its own forward, full depth)."""
    backbone = model.base_model.backbone
    if "pixel_values" in inputs:
        return backbone(inputs["pixel_values"], output_hidden_states=True).hidden_states, None
    out = backbone(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        output_hidden_states=True,
        output_attentions=True,
    )
    return out.hidden_states, out.attentions


@pytest.mark.parametrize("head", sorted(HEADS))
def test_output_flags_from_the_config_and_the_backbone_layout(head):
    """At full depth, the hidden states and attentions are the backbone's own, except a decoder's last hidden state:
    it is the last block's output, where GPT-2 and Llama apply their final norm (ADNet applies it in the step head,
    at every step)."""
    model = build(head).eval()
    inputs = inputs_for(head, labels=False)
    model.config.output_hidden_states = True
    model.config.output_attentions = HEADS[head][2] != "image"
    with torch.no_grad():
        ours = model(**inputs, exit_policy="none")
        hidden_states, attentions = backbone_outputs(model, inputs)
    assert len(ours.hidden_states) == len(hidden_states)
    compared = hidden_states[:-1] if model.base_model.adapter.is_causal else hidden_states
    real = inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)
    for index, theirs in enumerate(compared):
        torch.testing.assert_close(ours.hidden_states[index][real], theirs[real], msg=f"hidden state {index}")
    if attentions is not None:
        assert len(ours.attentions) == len(attentions)
        for index, theirs in enumerate(attentions):
            query_rows = (ours.attentions[index].transpose(1, 2)[real], theirs.transpose(1, 2)[real])
            torch.testing.assert_close(*query_rows, msg=f"attention {index}")


def exiting_items(out, inputs: dict, layers_per_step: int) -> list[tuple[tuple, int]]:
    """(index into a hidden state, blocks executed) of every real item: a sample, or a token of a causal LM."""
    blocks = out.exit_steps * layers_per_step
    if blocks.dim() == 1:
        return [((row,), int(count)) for row, count in enumerate(blocks)]
    return [((row, token), int(blocks[row, token])) for row, token in inputs["attention_mask"].nonzero().tolist()]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_under_exits_skipped_blocks_carry_the_exit_state(head):
    """Hidden states keep the backbone's length: a block an item skipped holds its exit state (zeros where a CNN
    stage differs in shape); attentions of a sample that had left the batch are zero."""
    overrides = {"layers_per_step": 2} if HEADS[head][2] == "image" else {}  # a step per ResNet stage
    model, threshold = exiting_model(head, **overrides)
    inputs = inputs_for(head, labels=False)
    flags = {"output_hidden_states": True}
    if HEADS[head][2] != "image":  # as ResNetModel's, the image head's forward has no output_attentions
        flags["output_attentions"] = True
    with torch.no_grad():
        full = model(**inputs, exit_policy="none", **flags)
        out = model(**inputs, exit_policy="halting", exit_threshold=threshold, **flags)
    assert [state.shape for state in out.hidden_states] == [state.shape for state in full.hidden_states]
    assert out.attentions is None or len(out.attentions) == len(full.attentions)
    recorded = [-1, *model.base_model.adapter.hidden_state_blocks(model.config.backbone_config)]
    items = exiting_items(out, inputs, model.config.layers_per_step)
    assert len({blocks for _, blocks in items}) > 1, "every item exited at the same block: nothing to check"
    for index, blocks in items:
        exit_state = out.hidden_states[recorded.index(blocks - 1)][index]
        for entry, block in enumerate(recorded):
            if block >= blocks:
                state = out.hidden_states[entry][index]
                assert torch.equal(state, exit_state) if state.shape == exit_state.shape else (state == 0).all()
    if out.attentions is not None:
        sample_blocks = [max(blocks for index, blocks in items if index[0] == row) for row in range(len(out.logits))]
        for row, blocks in enumerate(sample_blocks):
            assert all((attention[row] == 0).all() for attention in out.attentions[blocks:])


@pytest.mark.parametrize("head", TEXT_HEADS)
def test_gradient_checkpointing_gives_the_same_gradients(head):
    inputs = inputs_for(head)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build(head).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            blocks = model.base_model.adapter.blocks(model.base_model.backbone)
            assert all(block.gradient_checkpointing for block in blocks)
        model(**inputs).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_image_head_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="does not support"):
        build("resnet-image").gradient_checkpointing_enable()


@pytest.mark.parametrize("exits", [False, True], ids=["full_depth", "exits"])
@pytest.mark.parametrize("head", CAUSAL_HEADS)
def test_static_cache_generation_equals_dynamic(head, exits):
    model, threshold = exiting_model(head)
    ids, mask = token_batch(batch=3, length=5, pad_lengths=(0, 2, 1), left_padding=True)
    kwargs = {
        "attention_mask": mask,
        "max_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
        "exit_policy": "halting" if exits else "none",
        "exit_threshold": threshold if exits else None,
        "return_dict_in_generate": True,
        "output_scores": True,
        "output_hidden_states": True,
    }
    with torch.no_grad():
        dynamic = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic.sequences, static.sequences)
    for ours, theirs in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # every decoding step reports the backbone's length of hidden states, exits or not
    assert {len(step) for step in dynamic.hidden_states} == {model.config.num_blocks + 1}


@pytest.mark.parametrize("head", TEXT_HEADS)
def test_a_4d_attention_mask_is_refused_by_name(head):
    inputs = inputs_for(head, labels=False)
    mask = inputs["attention_mask"]
    inputs["attention_mask"] = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    with pytest.raises(ValueError, match=r"attention_mask must have shape .*a 2-D token mask"):
        build(head)(**inputs)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_config_exposes_what_utilities_read(head):
    model = build(head)
    backbone = model.config.backbone_config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(model.config, name, None) == getattr(backbone, name, None), name
    if hasattr(backbone, "vocab_size"):
        model.config.vocab_size = 120
        assert backbone.vocab_size == 120


def assert_config_round_trips(model, folder) -> None:
    """The config `save_pretrained` writes loads back as the live one, which also survives `to_dict` / `from_dict`
    before and after saving: a field the model resolves (e.g. `halting_evidence`) must be resolved in both."""
    assert ADNetConfig.from_dict(model.config.to_dict()).to_dict() == model.config.to_dict()
    model.save_pretrained(folder)
    live = model.config.to_dict()
    assert ADNetConfig.from_pretrained(folder).to_dict() == live
    assert ADNetConfig.from_dict(live).to_dict() == live


@pytest.mark.parametrize("head", sorted(HEADS))
def test_saved_config_loads_as_the_live_one(head, tmp_path):
    assert_config_round_trips(build(head), tmp_path)


@pytest.mark.parametrize("backbone", [bert_config, gpt2_config], ids=["bert", "gpt2"])
def test_base_model_config_loads_as_the_live_one(backbone, tmp_path):
    assert_config_round_trips(ADNetModel(ADNetConfig(backbone_config=backbone(), unit_hidden_size=8)), tmp_path)


# How low-memory loading builds a model with no storage. accelerate's `init_empty_weights()` moves parameters only
# (`include_buffers=False`: buffers stay where their module made them, as for any Transformers model).
EMPTY_CONSTRUCTIONS = {
    "torch.device": (lambda: torch.device("meta"), True),
    "init_empty_weights": (init_empty_weights, False),
    "init_empty_weights-buffers": (lambda: init_empty_weights(include_buffers=True), True),
}


@pytest.mark.parametrize("construction", sorted(EMPTY_CONSTRUCTIONS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_meta_device_construction_leaves_every_tensor_on_meta(head, construction):
    """Nothing ADNet adds is made on an explicit device: under a meta-device construction every parameter (and
    buffer, where the construction moves buffers) is on `meta`, as `from_pretrained`'s low-memory path needs."""
    context, moves_buffers = EMPTY_CONSTRUCTIONS[construction]
    with context():
        model = build(head)
    tensors = [*model.named_parameters(), *(model.named_buffers() if moves_buffers else ())]
    off_meta = [f"{name} on {tensor.device}" for name, tensor in tensors if tensor.device.type != "meta"]
    assert not off_meta, f"not on meta under {construction}: {off_meta}"


@pytest.mark.parametrize("policy", ["confidence", "patience"])
def test_base_model_runs_a_checkpoint_saved_with_a_prediction_rule(policy, tmp_path, caplog):
    build("bert-sequence", exit_policy=policy).save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    inputs = inputs_for("bert-sequence", labels=False)
    with torch.no_grad():
        out = base(**inputs)
    assert (out.exit_steps == base.config.num_steps).all()
    assert "running at full depth" in caplog.text and "ADNetForSequenceClassification" in caplog.text
    with pytest.raises(ValueError, match="needs step predictions"):
        base(**inputs, exit_policy=policy)


def train_one_step(head: str, trainer_class, args_class, batch: int, accumulation: int, tmp_path, **arguments) -> dict:
    data = inputs_for(head, batch=8)
    dataset = [{name: values[i] for name, values in data.items()} for i in range(8)]
    torch.manual_seed(0)
    model = build(head)
    for module in model.modules():  # BatchNorm's batch statistics differ between micro-batches by design
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(lambda norm, _: setattr(norm, "training", False))
    args = args_class(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        report_to="none",
        seed=0,
        **arguments,
    )
    trainer_class(model=model, args=args, train_dataset=dataset).train()
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    "trainer_class,args_class",
    [(Trainer, TrainingArguments), (ADNetTrainer, ADNetTrainingArguments), (ADNetTrainer, TrainingArguments)],
    ids=["Trainer", "ADNetTrainer", "ADNetTrainer-plain-arguments"],
)
@pytest.mark.parametrize("head", sorted(HEADS))
def test_gradient_accumulation_matches_the_full_batch(head, trainer_class, args_class, tmp_path):
    """1 x 8, 2 x 4 and 4 x 2 give the same weights after one SGD step: a doubled or halved loss would show. The
    causal LM's micro-batches hold different numbers of predicted tokens, so only the token-weighted
    `num_items_in_batch` scaling makes them equal. A ResNet's BatchNorm normalises with the statistics of the batch it
    sees, so micro-batches cannot match the full batch (as for the plain ResNet): its norms use running statistics
    here, which leaves the loss scaling to compare."""
    reference = train_one_step(head, trainer_class, args_class, 8, 1, tmp_path)
    for batch, accumulation in ((4, 2), (2, 4)):
        accumulated = train_one_step(head, trainer_class, args_class, batch, accumulation, tmp_path)
        for name, value in reference.items():
            torch.testing.assert_close(accumulated[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "trainer_class,args_class",
    [(Trainer, TrainingArguments), (ADNetTrainer, ADNetTrainingArguments)],
    ids=["Trainer", "ADNetTrainer"],
)
@pytest.mark.parametrize("head", TEXT_HEADS)
def test_gradient_checkpointing_through_the_trainers(head, trainer_class, args_class, tmp_path):
    reference = train_one_step(head, trainer_class, args_class, 8, 1, tmp_path)
    checkpointed = train_one_step(head, trainer_class, args_class, 8, 1, tmp_path, gradient_checkpointing=True)
    for name, value in reference.items():
        torch.testing.assert_close(checkpointed[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("head", ["bert-sequence", "resnet-image"])
def test_when_every_sample_exits_early_the_later_entries_keep_the_backbone_layout(head):
    """The pass ends when the last sample leaves: the blocks no sample ran still get entries of their own shape
    (the exit state where it has that shape, else zeros)."""
    overrides = {"layers_per_step": 2} if head == "resnet-image" else {}
    model = build(head, **overrides).eval()
    inputs = inputs_for(head, labels=False)
    with torch.no_grad():
        full = model(**inputs, exit_policy="none", output_hidden_states=True)
        out = model(**inputs, exit_policy="halting", exit_threshold=0.999, output_hidden_states=True)
    assert (out.exit_steps == 1).all()
    assert [state.shape for state in out.hidden_states] == [state.shape for state in full.hidden_states]
    exit_state = out.hidden_states[1]  # the first step's last output: recorded by both layouts
    for state in out.hidden_states[2:]:
        assert torch.equal(state, exit_state) if state.shape == exit_state.shape else (state == 0).all()
    if head == "resnet-image":
        assert out.hidden_states[-1].shape != out.hidden_states[1].shape  # the zeros case was exercised
