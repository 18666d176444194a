"""Per-token exit in generate(): the cache of exited tokens is filled by propagating their exit state."""

import pytest
import torch
from conftest import DECODER_BACKBONES, lm_model, midpoint_threshold, spread_halting, token_batch
from transformers import DynamicCache

NEW_TOKENS = 6


def model_with_split_exits(backbone, ids, mask):
    """Some tokens exit at the first step, others later (thresholds from the model's own halting values)."""
    model = lm_model(backbone, num_fixed_steps=0).eval()
    spread_halting(model, scale=5.0)
    with torch.no_grad():
        first_lambda = model(
            input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True
        ).halting_probs[..., 0]
    model.config.halting_epsilon = midpoint_threshold(1 - first_lambda[mask.bool()])
    return model


def generate(model, ids, mask):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )


@pytest.fixture(params=sorted(DECODER_BACKBONES))
def setup(request):
    torch.manual_seed(0)
    ids, mask = token_batch(batch=3, length=5, pad_lengths=(0, 2, 1), left_padding=True)
    model = model_with_split_exits(request.param, ids, mask)
    with torch.no_grad():
        out = generate(model, ids, mask)
    full_mask = torch.cat([mask, torch.ones(3, NEW_TOKENS, dtype=torch.long)], dim=1)
    return model, ids, mask, out, full_mask


def test_generation_with_exits_equals_the_full_sequence_forward(setup):
    model, ids, _, out, full_mask = setup
    with torch.no_grad():
        reference = model(input_ids=out.sequences, attention_mask=full_mask)
    exits = reference.exit_steps[full_mask.bool()]
    assert exits.min() < model.config.num_steps and len(set(exits.tolist())) > 1, "no variety in exits"
    prompt = ids.shape[1]
    for index, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, reference.logits[:, prompt + index - 1], rtol=1e-4, atol=1e-5)


def test_cache_holds_the_propagated_keys_and_values(setup):
    """Every layer's cache entry of an exited token equals its exit state through that layer's K/V projections."""
    model, _, _, out, full_mask = setup
    sequences, mask = out.sequences[:, :-1], full_mask[:, :-1]  # the last token was never fed back
    with torch.no_grad():
        reference = model(input_ids=sequences, attention_mask=mask, output_hidden_states=True)
    adnet = model.adnet
    state = adnet.adapter.embed(adnet.backbone, {"input_ids": sequences, "attention_mask": mask})
    blocks = adnet.adapter.blocks(adnet.backbone)
    checked = 0
    for row, position in mask.nonzero().tolist():
        exit_step = int(reference.exit_steps[row, position])
        exit_state = reference.hidden_states[exit_step][row : row + 1, position : position + 1]
        kwargs = {k: v for k, v in state.block_kwargs.items() if k == "position_embeddings"}
        if kwargs:
            kwargs["position_embeddings"] = tuple(
                t[row : row + 1, position : position + 1] for t in kwargs["position_embeddings"]
            )
        for layer in range(exit_step, len(blocks)):
            key, value = adnet.adapter.kv_projection(blocks[layer], exit_state, kwargs)
            cached = out.cache.layers[layer]
            torch.testing.assert_close(cached.keys[row, :, position], key[0, :, 0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cached.values[row, :, position], value[0, :, 0], rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 0


def test_batched_generation_equals_one_by_one(setup):
    model, ids, mask, out, _ = setup
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        with torch.no_grad():
            single = generate(model, ids[row : row + 1, real], mask[row : row + 1, real])
        assert torch.equal(single.sequences[0, -NEW_TOKENS:], out.sequences[row, -NEW_TOKENS:])


def test_full_sequence_cache_matches_generation_cache(setup):
    """Prefilling the generated text in one pass builds the same cache as decoding it token by token."""
    model, _, _, out, full_mask = setup
    cache = DynamicCache(config=model.config.backbone_config)
    with torch.no_grad():
        model(input_ids=out.sequences[:, :-1], attention_mask=full_mask[:, :-1], cache=cache)
    real = full_mask[:, :-1].bool()
    for layer in range(model.config.num_blocks):
        for name in ("keys", "values"):
            prefilled = getattr(cache.layers[layer], name).transpose(1, 2)[real]
            decoded = getattr(out.cache.layers[layer], name).transpose(1, 2)[real]
            torch.testing.assert_close(prefilled, decoded, rtol=1e-4, atol=1e-5)
