"""Self-speculative decoding (`generate(..., assistant_early_exit=k)`): the full model's output, each block run once
per token, the full model's distribution when sampling."""

import argparse
import json

import pytest
import torch
from conftest import DECODER_BACKBONES, gpt2_config, lm_model
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, GPT2Tokenizer
from transformers.generation.streamers import BaseStreamer

from adnet_hf import ADNetConfig, ADNetForCausalLM
from adnet_hf.speculative_adnet import SelfSpeculativeDecoder, frequent_tokens, speculative_sampling
from benchmarks import bench_speculative
from benchmarks.bench_speculative import plain_causal_lm

NEW_TOKENS = 16


def drafting_model(backbone: str, **overrides):
    """A tiny causal LM whose blocks change its predictions (random tiny blocks barely move the residual stream,
    so every depth would predict alike and every draft would be accepted)."""
    model = lm_model(backbone, **overrides).eval()
    with torch.no_grad():
        for name, weight in model.adnet.backbone.named_parameters():
            if weight.dim() == 2 and not any(key in name for key in ("wte", "wpe", "embed")):
                weight.normal_(0.0, 0.3)
    return model


def speculative(model, ids, **settings):
    settings = {"assistant_confidence_threshold": 0.0, "num_assistant_tokens": 4, "eos_token_id": None, **settings}
    return model.generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True, **settings
    )


@pytest.fixture(params=sorted(DECODER_BACKBONES))
def model(request):
    return drafting_model(request.param)


PROMPTS = [torch.tensor([[5, 17, 33, 8, 61]]), torch.tensor([[90, 4]]), torch.tensor([[12, 12, 40, 77, 3, 9, 51, 26]])]


@pytest.mark.parametrize("prompt", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in range(1, len(PROMPTS)))])
def test_greedy_output_is_the_full_depth_output(model, prompt):
    ids = PROMPTS[prompt]
    reference = plain_causal_lm(model).generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    full_depth = model.generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0, exit_policy="none"
    )
    assert torch.equal(full_depth, reference)
    rejected = 0
    for depth, length, threshold in [(1, 1, 0.0), (2, 4, 0.0), (3, 20, 0.0), (2, 20, 0.2)]:
        out = speculative(
            model,
            ids,
            assistant_early_exit=depth,
            num_assistant_tokens=length,
            assistant_confidence_threshold=threshold,
        )
        assert torch.equal(out.sequences, reference), (depth, length, threshold)
        rejected += out.drafted_tokens - out.accepted_tokens
    assert rejected > 0, "every draft was accepted: the test would not see a wrong rollback"


def test_left_padded_prompt_gives_the_full_depth_output(model):
    ids, mask = torch.tensor([[0, 0, 5, 17, 33, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    settings = {
        "attention_mask": mask,
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    reference = model.generate(ids, exit_policy="none", **settings)
    out = model.generate(
        ids, assistant_early_exit=2, num_assistant_tokens=3, assistant_confidence_threshold=0.0, **settings
    )
    assert torch.equal(out, reference)


def test_pad_token_in_a_prompt_without_a_mask_is_masked_as_generate_does(model):
    """Without an attention mask, generate() masks the pad token where it is not the end-of-sequence token (e.g. a
    chat template's end-of-turn token given as pad_token_id); self-speculative decoding must read the same mask."""
    ids = torch.tensor([[5, 17, 7, 33, 8, 7, 61]])
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": None, "pad_token_id": 7}
    reference = model.generate(ids, exit_policy="none", **settings)
    assert not torch.equal(reference, model.generate(ids, exit_policy="none", **{**settings, "pad_token_id": 0}))
    out = model.generate(
        ids, assistant_early_exit=2, num_assistant_tokens=3, assistant_confidence_threshold=0.0, **settings
    )
    assert torch.equal(out, reference)


def test_verification_runs_each_block_once_per_token(model):
    """Every block, before and after the exit, sees each fed token once: the verification reuses the draft's exit
    states and cache instead of running the first blocks again."""
    ids = PROMPTS[0]
    seen = []
    blocks = model.adnet.adapter.blocks(model.adnet.backbone)
    handles = [
        block.register_forward_hook(lambda module, args, out, i=i: seen.append((i, args[0].shape[1])))
        for i, block in enumerate(blocks)
    ]
    try:
        out = speculative(model, ids, assistant_early_exit=2)
    finally:
        for handle in handles:
            handle.remove()
    tokens = [sum(n for block, n in seen if block == i) for i in range(len(blocks))]
    assert out.drafted_tokens > out.accepted_tokens
    assert tokens == [ids.shape[1] + out.drafted_tokens + out.verifications] * len(blocks)
    upper_calls = [n for block, n in seen if block == len(blocks) - 1]
    assert len(upper_calls) == 1 + out.verifications  # the prompt, then one pass per verification
    assert out.cache.get_seq_length(0) == out.cache.get_seq_length(3) == out.sequences.shape[1] - 1


def test_confidence_threshold_cuts_drafts_short(model):
    ids = PROMPTS[0]
    fixed = speculative(model, ids, assistant_early_exit=2, num_assistant_tokens=4)
    adaptive = speculative(
        model, ids, assistant_early_exit=2, num_assistant_tokens=4, assistant_confidence_threshold=1.0
    )
    assert adaptive.drafted_tokens <= adaptive.verifications  # one token per draft at most
    assert adaptive.drafted_tokens < fixed.drafted_tokens
    assert torch.equal(adaptive.sequences, fixed.sequences)


def test_logits_processors_apply_to_draft_and_verification(model):
    """With a repetition penalty and a token barred, the output is still greedy search's with the same settings."""
    ids, settings = PROMPTS[0], {"repetition_penalty": 1.5, "bad_words_ids": [[7]]}
    reference = model.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        exit_policy="none",
        **settings,
    )
    out = speculative(model, ids, assistant_early_exit=2, **settings)
    assert torch.equal(out.sequences, reference) and 7 not in out.sequences[0, ids.shape[1] :]


def test_streamer_gets_the_prompt_then_every_new_token(model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer, ids = Collect(), PROMPTS[0]
    out = speculative(model, ids, assistant_early_exit=1, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out.sequences[0, ids.shape[1] :].tolist()
    assert len(streamer.chunks) == 2 + out.verifications


def test_stops_at_the_end_of_sequence_token_as_greedy_search_does(model):
    ids = PROMPTS[0]
    full = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(full[0, ids.shape[1] + 5])
    reference = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = speculative(model, ids, assistant_early_exit=2, eos_token_id=eos)
    assert torch.equal(out.sequences, reference) and out.sequences[0, -1] == eos


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"assistant_early_exit": 4}, "assistant_early_exit"),
        ({"assistant_early_exit": 0}, "assistant_early_exit"),
        ({"assistant_early_exit": 2, "num_assistant_tokens": 0}, "num_assistant_tokens"),
        ({"assistant_early_exit": 2, "num_assistant_tokens_schedule": "heuristic"}, "num_assistant_tokens_schedule"),
        ({"assistant_early_exit": 2, "assistant_confidence_threshold": 1.5}, "assistant_confidence_threshold"),
        ({"assistant_early_exit": 2, "cache_implementation": "static"}, "cache_implementation"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        lm_model("gpt2").generate(PROMPTS[0], max_new_tokens=3, **settings)


def test_a_batch_a_depth_between_exits_and_other_inputs_are_refused():
    with pytest.raises(ValueError, match="batch of 1"):
        lm_model("gpt2").generate(torch.cat(PROMPTS[:1] * 2), max_new_tokens=3, assistant_early_exit=2)
    with pytest.raises(ValueError, match="multiple of layers_per_step=2"):
        lm_model("gpt2", layers_per_step=2, num_fixed_steps=0).generate(
            PROMPTS[0], max_new_tokens=3, assistant_early_exit=1
        )
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn"):
        lm_model("gpt2").generate(
            PROMPTS[0], max_new_tokens=3, assistant_early_exit=2, prefix_allowed_tokens_fn=lambda batch, ids: [5]
        )


def test_per_token_exit_generation_is_unchanged_by_the_flag_being_absent(model):
    """Without `assistant_early_exit`, generate() is Transformers' own, per-token exits included."""
    ids = PROMPTS[0]
    out = model.generate(
        ids,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        exit_policy="halting",
        exit_threshold=0.5,
        return_dict_in_generate=True,
    )
    assert type(out).__name__ == "GenerateDecoderOnlyOutput"


def test_checkpoint_saved_before_speculative_decoding_loads_and_drafts(model, tmp_path):
    """A checkpoint without `speculative_adnet.py` (saved before it existed) loads and decodes speculatively."""
    model.save_pretrained(tmp_path)
    (tmp_path / "speculative_adnet.py").unlink()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = PROMPTS[2]
    assert torch.equal(
        speculative(loaded, ids, assistant_early_exit=2).sequences,
        speculative(model, ids, assistant_early_exit=2).sequences,
    )


def next_token_scores(model, ids, depth: int | None = None) -> torch.Tensor:
    """Logits of the token after `ids` (rows) at full depth, or at the exit after `depth` blocks."""
    with torch.no_grad():
        out = model(input_ids=ids, exit_policy="none", output_hidden_states=depth is not None)
        if depth is None:
            return out.logits[:, -1]
        return model.step_head(0, None, out.hidden_states[depth][:, -1:])[:, 0]


def p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Chi-square p-value of `counts` under `expected_probs`, bins of small expected count merged (a bin expected
    nowhere must be empty)."""
    expected = expected_probs.double() / expected_probs.double().sum() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = expected > 0
    return chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue


def assert_follows(counts: torch.Tensor, probs: torch.Tensor, draft_probs: torch.Tensor) -> None:
    """Counts agree with `probs` and not with `draft_probs`, which shows the test can tell the two apart."""
    assert p_value(counts, probs) > 1e-3
    assert p_value(counts, draft_probs) < 1e-6


def test_speculative_sampling_rule_keeps_the_full_models_distribution():
    """Drafts drawn from the exit's distribution q, kept or replaced by the rule: the first token follows p."""
    model = drafting_model("gpt2")
    ids = PROMPTS[0]
    p_scores, q_scores = next_token_scores(model, ids)[0], next_token_scores(model, ids, depth=1)[0]
    q = torch.softmax(q_scores, -1)
    samples = 8000
    torch.manual_seed(0)
    drafts = torch.multinomial(q, samples, replacement=True)
    firsts = [speculative_sampling([draft], [q_scores], [p_scores, p_scores])[0] for draft in drafts]
    counts = torch.bincount(torch.stack(firsts), minlength=q.shape[0])
    assert_follows(counts, torch.softmax(p_scores, -1), q)


@pytest.mark.slow
def test_speculative_sampling_through_generate_keeps_the_full_models_distribution():
    """The second new token (the first drafted one) of `generate(do_sample=True, assistant_early_exit=1)` follows
    the full model's marginal `sum_t p(t | prompt) p(x | prompt, t)`, computed exactly over the vocabulary (at
    temperature 0.25, which sharpens the tiny model's distributions enough to tell the draft's apart)."""
    model, temperature = drafting_model("gpt2"), 0.25
    ids = PROMPTS[0]
    vocab = model.config.vocab_size
    first = torch.softmax(next_token_scores(model, ids)[0] / temperature, -1)
    continued = torch.cat([ids.expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
    marginal = first @ torch.softmax(next_token_scores(model, continued) / temperature, -1)
    draft_marginal = first @ torch.softmax(next_token_scores(model, continued, depth=1) / temperature, -1)
    torch.manual_seed(0)
    seconds = [
        model.generate(
            ids,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=3,  # two would leave no room to draft: the last new token is never drafted
            assistant_early_exit=1,
            num_assistant_tokens=1,
            assistant_confidence_threshold=0.0,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] + 1]
        for _ in range(2000)
    ]
    assert_follows(torch.bincount(torch.stack(seconds), minlength=vocab), marginal, draft_marginal)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["--model", "--backbone"])
def test_benchmark_reports_identical_outputs_and_acceptance(tmp_path, shared_data, source):
    """On an ADNet checkpoint, or a plain GPT-2 checkpoint wrapped with its weights unchanged."""
    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(vocab_size=len(tokenizer)), unit_hidden_size=8))
    (model if source == "--model" else plain_causal_lm(model)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = bench_speculative.main(
        [
            source,
            str(tmp_path / "model"),
            "--data",
            str(shared_data / "ptb" / "ptb.valid.txt"),
            "--name",
            "tiny",
            "--prompts",
            "2",
            "--prompt_length",
            "6",
            "--new_tokens",
            "5",
            "--depths",
            "1",
            "3",
            "--draft_lengths",
            "2",
            "--thresholds",
            "0",
            "0.5",
            "--repeats",
            "1",
            "--results_dir",
            str(tmp_path / "r"),
            "--draft_vocab_size",
            "50",
            "--draft_vocab_data",
            str(shared_data / "ptb" / "ptb.valid.txt"),
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert [
        (row["assistant_early_exit"], row["assistant_confidence_threshold"], row["draft_vocab_size"]) for row in rows
    ] == [(depth, threshold, size) for depth in (1, 3) for threshold in (0.0, 0.5) for size in (None, 50)]
    assert all(
        row["identical_outputs"] and 0 <= row["acceptance_rate"] <= 1 and row["tokens_per_s"] > 0 for row in rows
    )


@pytest.mark.slow
def test_benchmark_compares_the_draft_unit_and_prompt_lookup(tmp_path, shared_data):
    """A model with a draft unit (over its own vocabulary) beside Transformers' prompt lookup on the plain model:
    both lossless, the unit's rows with draft statistics and its vocabulary's size, prompt lookup's without."""
    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(vocab_size=len(tokenizer)), unit_hidden_size=8))
    model.add_draft_unit(torch.arange(40))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    arguments = ["--model", str(tmp_path / "model"), "--data", str(shared_data / "ptb" / "ptb.valid.txt")]
    arguments += ["--name", "tiny", "--prompts", "2", "--prompt_length", "6", "--new_tokens", "5", "--repeats", "1"]
    arguments += ["--draft_unit", "--draft_lengths", "2", "--prompt_lookup", "2", "--results_dir", str(tmp_path)]
    result = json.loads(bench_speculative.main([*arguments, "--verify_lengths", "3", "5"]).read_text())
    assert set(result["verification_costs"]) == {"3", "5"} and all(c > 0 for c in result["verification_costs"].values())
    rows = result["rows"]
    unit, lookup = rows
    assert unit["use_draft_unit"] and unit["draft_vocab_size"] == 40 and 0 <= unit["acceptance_rate"] <= 1
    assert lookup["prompt_lookup_num_tokens"] == 2 and "acceptance_rate" not in lookup
    assert all(row["identical_outputs"] and row["identical_prompts"] == 2 and row["tokens_per_s"] > 0 for row in rows)
    result = json.loads(bench_speculative.main([*arguments, "--dtype", "bfloat16"]).read_text())
    assert result["dtype"] == "bfloat16" and all(0 <= row["identical_prompts"] <= 2 for row in result["rows"])


def test_a_draft_vocabulary_keeps_the_full_depth_output(model, monkeypatch):
    """Drafts restricted to a few tokens (most of them rejected) or to the tokens the output uses: the same output,
    and the draft's logits are finite on its vocabulary only."""
    ids = PROMPTS[2]
    reference = plain_causal_lm(model).generate(
        ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    finite = set()
    original = SelfSpeculativeDecoder.draft_head

    def draft_head(self, hidden):
        logits = original(self, hidden)
        finite.update(logits.isfinite().nonzero()[:, 1].tolist())
        return logits

    monkeypatch.setattr(SelfSpeculativeDecoder, "draft_head", draft_head)
    accepted = []
    for vocabulary in (torch.tensor([3, 50, 7]), frequent_tokens(reference, 12, model.config.vocab_size)):
        finite.clear()
        out = speculative(model, ids, assistant_early_exit=2, num_assistant_tokens=4, draft_vocabulary=vocabulary)
        assert torch.equal(out.sequences, reference)
        assert finite == set(vocabulary.tolist())
        accepted.append(out.accepted_tokens)
    assert accepted[0] < accepted[1]
    assert frequent_tokens(torch.tensor([5, 5, 9, 5, 9, 1]), 2, 10).tolist() == [5, 9]


def test_speculative_sampling_with_a_draft_vocabulary_keeps_the_full_models_distribution():
    """Drafts drawn from the exit's distribution over a few tokens (0 elsewhere): the first token still follows p."""
    model = drafting_model("gpt2")
    ids = PROMPTS[0]
    p_scores, q_scores = next_token_scores(model, ids)[0], next_token_scores(model, ids, depth=1)[0]
    vocabulary = q_scores.topk(10).indices
    q_scores = torch.full_like(q_scores, float("-inf")).index_copy(0, vocabulary, q_scores[vocabulary])
    q = torch.softmax(q_scores, -1)
    torch.manual_seed(0)
    drafts = torch.multinomial(q, 4000, replacement=True)
    firsts = [speculative_sampling([draft], [q_scores], [p_scores, p_scores])[0] for draft in drafts]
    counts = torch.bincount(torch.stack(firsts), minlength=q.shape[0])
    assert p_value(counts, torch.softmax(p_scores, -1)) > 1e-3
    outside = torch.ones_like(q, dtype=torch.bool).index_fill(0, vocabulary, False)
    assert counts[outside].sum() > 500  # tokens the draft never proposes, from the residual max(0, p - q)


@pytest.mark.parametrize(
    "vocabulary, error",
    [
        ([1, 2], TypeError),
        (torch.tensor([1.0]), TypeError),
        (torch.tensor([], dtype=torch.long), TypeError),
        (torch.tensor([[1, 2]]), TypeError),
        (torch.tensor([1, 99]), ValueError),
        (torch.tensor([-1]), ValueError),
        (torch.tensor([4, 4]), ValueError),
    ],
)
def test_a_bad_draft_vocabulary_is_refused(vocabulary, error):
    with pytest.raises(error, match="draft_vocabulary"):
        lm_model("gpt2").generate(PROMPTS[0], max_new_tokens=3, assistant_early_exit=2, draft_vocabulary=vocabulary)


def test_profile_splits_one_generation_into_the_decoders_phases(model):
    """Every phase the decoder labels takes time, and together they take no more than the generation did."""
    phases = bench_speculative.phase_seconds(
        model,
        PROMPTS[0][0],
        8,
        {"assistant_early_exit": 2, "num_assistant_tokens": 3, "assistant_confidence_threshold": 0.0},
    )
    labelled = {phase: phases[f"{phase}_s"] for phase in bench_speculative.PHASES}
    assert labelled.pop("draft_unit") == 0  # an exit drafts with the first blocks, not with a draft unit
    assert all(seconds > 0 for seconds in labelled.values())
    total = sum(labelled.values()) + phases["other_s"]
    assert phases["other_s"] >= 0 and total == pytest.approx(phases["profiled_total_s"])


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_benchmark_prompts_file_gives_chat_template_user_turns(tmp_path, shared_data):
    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(["Say hi.", "Count to three.", "unused"]))
    args = argparse.Namespace(data=None, prompts_file=str(path), prompts=2)
    with pytest.raises(ValueError, match="chat template"):
        bench_speculative.load_prompts(args, tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    prompts = bench_speculative.load_prompts(args, tokenizer)
    assert [tokenizer.decode(ids) for ids in prompts] == [
        "<user>Say hi.\n<assistant>",
        "<user>Count to three.\n<assistant>",
    ]
    path.write_text(json.dumps({"instructions": ["Say hi."]}))
    with pytest.raises(ValueError, match="--prompts_file"):
        bench_speculative.load_prompts(args, tokenizer)
