"""Self-speculative decoding from ADNet's exits: the first blocks draft, the remaining blocks verify, nothing is lost.

Each round, the draft runs the blocks up to an exit (`assistant_early_exit` of them) and the shared LM head (through
that exit's adapter, `ADNetConfig.exit_adapters`, where the model has them) for one token at a time, up to
`num_assistant_tokens` tokens, stopping early once the draft's top probability falls below
`assistant_confidence_threshold`. The verification then runs only the blocks after the exit, over every drafted
token at once, on the exit hidden states the draft already computed and with the cache the draft already filled:
no block runs twice for a token. Greedy decoding keeps the longest drafted prefix the full model agrees with, plus
the full model's next token, so the output is token for token the full-depth greedy output. Sampling keeps a drafted
token with probability `min(1, p/q)` and otherwise samples from `max(0, p - q)` (Leviathan et al. 2023; Chen et al.
2023), so tokens follow the full model's distribution. On rejection every layer's cache is cropped back.

Where the LM head dominates a token's cost, a draft vocabulary (`generate(..., draft_vocabulary=ids)`, e.g. the most
frequent tokens of a corpus, `frequent_tokens`) makes the draft read only those rows of the head, the other tokens
getting -inf; the verification reads the whole head once per round for all drafted tokens, so the output (greedy) or
its distribution (sampling: q is 0 outside the vocabulary) is unchanged.

Why not Transformers' own `assistant_early_exit` path (`EarlyExitCandidateGenerator`): it drafts by lowering
`config.num_hidden_layers` on the model itself with a second cache, and verifies by running the whole model over the
drafted tokens from the embeddings up, so the shared blocks run twice for every token. On ADNet it also cannot
truncate a GPT-2 (whose blocks do not read `num_hidden_layers`) and would regroup a Llama's steps under its units.

A model that was not trained for early exit drafts with a draft unit instead (`generate(..., use_draft_unit=True)`,
`DraftUnitDecoder`, `draft_adnet.DraftUnit`): one layer that reads the full model's top features, under the same
rounds, threshold, verification and acceptance, except that the verification runs every block.

Each phase runs under a `torch.profiler.record_function` label (`speculative::prefill`, `::draft_blocks`,
`::draft_unit`, `::draft_head`, `::verify_blocks`, `::verify_head`), so a profile says where a generation's time goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .backbones_adnet import StepState


@dataclass
class SelfSpeculativeOutput(GenerateDecoderOnlyOutput):
    """What `ADNetForCausalLM.generate(..., assistant_early_exit=k, return_dict_in_generate=True)` returns, and the
    same with `use_draft_unit=True`.

    Transformers' `GenerateDecoderOnlyOutput` (`sequences`, and `scores` / `logits` with `output_scores` /
    `output_logits`), plus how the drafts fared: `accepted_tokens / drafted_tokens` is the acceptance rate.

    Attributes:
        sequences (torch.LongTensor): The prompt and the new tokens, `(1, length)`.
        scores (tuple[torch.Tensor, ...] | None): With `output_scores`: each new token's processed scores.
        logits (tuple[torch.Tensor, ...] | None): With `output_logits`: each new token's raw logits.
        verifications (int | None): Verification passes, one per round of drafting (the prompt's pass not counted).
        drafted_tokens (int | None): Tokens the draft proposed.
        accepted_tokens (int | None): Drafted tokens the full model kept.
        draft_depth (int | None): Backbone blocks the draft runs (0 for the draft unit).
    """

    verifications: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    draft_depth: int | None = None


class LayerOffsetCache:
    """The cache as the blocks from `first_layer` on see it: its length and mask sizes are that layer's, which is
    behind the first layers' while they hold drafted tokens the upper layers have not seen yet."""

    def __init__(self, cache, first_layer: int):
        self.cache, self.first_layer = cache, first_layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(self.first_layer + layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.cache.get_query_offset(self.first_layer + layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.cache.get_mask_sizes(query_length, self.first_layer + layer_idx)

    def __getattr__(self, name: str):
        return getattr(self.cache, name)


def crop_cache(cache, length: int) -> None:
    """Keep the first `length` tokens in every layer of a dynamic cache (layers hold different lengths here)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def draft_depth(config, depth) -> int:
    """`assistant_early_exit` checked: a positive step boundary below the full depth."""
    size, blocks = config.layers_per_step, config.num_blocks
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 < depth < blocks or depth % size:
        raise ValueError(
            f"assistant_early_exit must be a number of blocks at an exit (a multiple of layers_per_step="
            f"{size}) in [{size}, {blocks - size}], got {depth!r}."
        )
    return depth


def check_vocabulary(vocabulary, vocab_size: int, name: str = "draft_vocabulary") -> torch.LongTensor | None:
    """A draft vocabulary (the argument `name`) checked: None, or distinct token ids in [0, vocab_size) as a
    non-empty 1-D tensor."""
    if vocabulary is None:
        return None
    integers = (
        isinstance(vocabulary, torch.Tensor)
        and not vocabulary.is_floating_point()
        and not vocabulary.is_complex()
        and vocabulary.dtype != torch.bool
    )
    if not integers or vocabulary.dim() != 1 or not len(vocabulary):
        got = (
            f"a {vocabulary.dtype} tensor of shape {tuple(vocabulary.shape)}"
            if isinstance(vocabulary, torch.Tensor)
            else f"a {type(vocabulary).__name__}"
        )
        raise TypeError(f"{name} must be a non-empty 1-D integer tensor of token ids, got {got}.")
    if vocabulary.min() < 0 or vocabulary.max() >= vocab_size or len(vocabulary.unique()) != len(vocabulary):
        raise ValueError(f"{name} must hold distinct token ids in [0, {vocab_size}).")
    return vocabulary.long()


def head_rows(lm_head: nn.Linear, vocabulary: torch.LongTensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows (weight, bias) of the LM head a draft over `vocabulary` reads: its tokens', or all."""
    if vocabulary is None:
        return lm_head.weight, lm_head.bias
    return lm_head.weight[vocabulary], None if lm_head.bias is None else lm_head.bias[vocabulary]


def frequent_tokens(token_ids: torch.Tensor, size: int, vocab_size: int) -> torch.LongTensor:
    """A draft vocabulary: the `size` most frequent tokens of a corpus, most frequent first.

    Pass it as `generate(..., assistant_early_exit=k, draft_vocabulary=...)`: the draft then reads `size` rows of the
    LM head instead of `vocab_size`, which saves time where the head dominates a token's cost (a large vocabulary on
    a small model). The verification reads the whole head, so the output does not change; the acceptance rate
    falls where the text needs tokens outside the vocabulary.

    Args:
        token_ids (torch.Tensor): Token ids of any shape, e.g. a tokenised training corpus.
        size (int): Tokens to keep, in [1, `vocab_size`].
        vocab_size (int): The model's vocabulary size.

    Returns:
        `size` distinct token ids.
    """
    if not 1 <= size <= vocab_size:
        raise ValueError(f"size must be in [1, {vocab_size}], got {size}.")
    return torch.bincount(token_ids.flatten(), minlength=vocab_size).topk(size).indices


def check_settings(generation: GenerationConfig, batch_size: int, option: str = "assistant_early_exit") -> None:
    """Refuse what self-speculative decoding does not do, naming the setting; `option` is the one that asked for
    it (`assistant_early_exit` or `use_draft_unit`)."""
    if batch_size != 1:
        raise ValueError(
            f"{option} (self-speculative decoding) takes a batch of 1 prompt, got "
            f"{batch_size}: rows accept different numbers of drafted tokens; generate them one by one."
        )
    if generation.num_beams != 1 or generation.num_return_sequences != 1:
        raise ValueError(f"{option} needs num_beams=1 and num_return_sequences=1.")
    if generation.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"{option} crops the cache of each layer to its own length: it keeps a dynamic "
            f"cache, got cache_implementation={generation.cache_implementation!r}."
        )
    if not isinstance(generation.num_assistant_tokens, int) or generation.num_assistant_tokens < 1:
        raise ValueError(f"num_assistant_tokens must be an integer >= 1, got {generation.num_assistant_tokens!r}.")
    if generation.num_assistant_tokens_schedule != "constant":
        raise ValueError(
            f"{option} drafts a constant num_assistant_tokens (cut short by "
            "assistant_confidence_threshold): num_assistant_tokens_schedule must be 'constant', got "
            f"{generation.num_assistant_tokens_schedule!r}."
        )
    threshold = generation.assistant_confidence_threshold
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"assistant_confidence_threshold must be None or a number in [0, 1], got {threshold!r}.")


class SelfSpeculativeDecoder:
    """One `generate` call of self-speculative decoding on an `ADNetForCausalLM`, batch 1.

    `sequence` holds the prompt and the emitted tokens; the cache holds every token but the last emitted one in
    every layer between rounds.
    """

    def __init__(
        self,
        model,
        generation: GenerationConfig,
        processors: LogitsProcessorList,
        stopping: StoppingCriteriaList,
        attention_mask: torch.Tensor,
        streamer=None,
        draft_vocabulary: torch.Tensor | None = None,
    ):
        self.model, self.generation, self.processors, self.stopping = model, generation, processors, stopping
        adnet = model.adnet
        self.adapter, self.backbone = adnet.adapter, adnet.backbone
        self.blocks = self.adapter.blocks(self.backbone)
        self.depth = self.draft_blocks()
        self.threshold = generation.assistant_confidence_threshold or 0.0
        self.cache = DynamicCache(config=model.config.backbone_config)
        self.upper_cache = LayerOffsetCache(self.cache, self.depth)
        room = generation.max_length + generation.num_assistant_tokens + 1 - attention_mask.shape[1]
        self.mask = torch.cat([attention_mask, attention_mask.new_ones(1, max(room, 0))], dim=1)
        self.streamer = streamer
        self.vocabulary = check_vocabulary(draft_vocabulary, model.lm_head.weight.shape[0])
        if self.vocabulary is None:
            self.vocabulary = self.own_vocabulary()
        self.draft_rows = head_rows(model.lm_head, self.vocabulary)
        self.scores: list[torch.Tensor] = []
        self.raw_logits: list[torch.Tensor] = []
        self.verifications = self.drafted = self.accepted = 0
        self.exit_hidden: list[torch.Tensor] = []  # this round's exit states of the tokens fed, the last emitted first

    def draft_blocks(self) -> int:
        """Backbone blocks the draft runs: `assistant_early_exit`, checked."""
        return draft_depth(self.model.config, self.generation.assistant_early_exit)

    def own_vocabulary(self) -> torch.LongTensor | None:
        """The draft's vocabulary where `draft_vocabulary` is not given: none for an exit (every token)."""
        return None

    def run_blocks(
        self, tokens: torch.Tensor, start: int, stop: int, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blocks `start` to `stop` (exclusive) on `tokens` (1 x n), from `hidden` (their input at block `start`)
        or, for `start == 0`, from the embeddings; the cache gets their keys/values."""
        view = self.cache if start == 0 else self.upper_cache
        past = view.get_seq_length()
        state = self.adapter.embed(
            self.backbone, {"input_ids": tokens, "attention_mask": self.mask[:, : past + tokens.shape[1]]}, view
        )
        hidden = state.hidden if hidden is None else hidden
        for block in self.blocks[start:stop]:
            hidden = self.adapter.run_block(block, StepState(hidden, state.token_mask, state.block_kwargs), self.cache)
        return hidden

    def head(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """The shared LM head on the output of the first `depth` blocks (1 x n x H), through the final norm and that
        exit's adapter if the model has one, as float logits (n x vocab)."""
        return self.model.exit_head(hidden, depth)[0].float()

    def draft_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's logits (n x vocab) from its output `hidden` (1 x n x H): with a draft vocabulary, only its rows
        of the LM head are read, and every other token gets -inf (the draft never proposes it; verification still
        can)."""
        states = self.draft_states(hidden)[0]
        if self.vocabulary is None:
            return self.model.lm_head(states).float()
        logits = states.new_full(
            (states.shape[0], self.model.lm_head.weight.shape[0]), float("-inf"), dtype=torch.float
        )
        logits[:, self.vocabulary] = F.linear(states, *self.draft_rows).float()
        return logits

    def draft_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads of the draft's output: the exit's, through its adapter and the final norm."""
        return self.model.exit_states(hidden, self.depth)

    def processed(self, sequence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next-token scores after `sequence` (1 x length) as `generate` processes them (penalties, temperature)."""
        return self.processors(sequence, logits.unsqueeze(0))[0]

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token from processed scores: the argmax, or a sample when `do_sample`."""
        if self.generation.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), 1)[0]
        return scores.argmax(-1)

    def generate(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Decode from `input_ids` (1 x prompt) until a stopping criterion holds; returns prompt and new tokens."""
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())
        with record_function("speculative::prefill"):
            hidden = self.run_blocks(input_ids, 0, len(self.blocks))
            self.keep_features(hidden)
            logits = self.head(hidden[:, -1:], len(self.blocks))[0]
        scores = self.processed(input_ids, logits)
        sequence, done = self.emit(input_ids, [self.choose(scores)], [logits], [scores])
        while not done:
            sequence, done = self.round(sequence)
        crop_cache(self.cache, sequence.shape[1] - 1)
        if self.streamer is not None:
            self.streamer.end()
        return sequence

    def round(self, sequence: torch.LongTensor) -> tuple[torch.LongTensor, bool]:
        """Draft from the last emitted token, verify the drafts in one pass of the full model, emit what is kept."""
        past = sequence.shape[1] - 1
        remaining = self.generation.max_length - sequence.shape[1]
        drafts, draft_scores = self.draft(sequence, min(self.generation.num_assistant_tokens, max(remaining - 1, 0)))
        fed = torch.cat([sequence[:, -1:], *[token.view(1, 1) for token in drafts]], dim=1)
        hidden = self.verify(fed)
        with record_function("speculative::verify_head"):
            logits = self.head(hidden, len(self.blocks))
        candidate = torch.cat([sequence, fed[:, 1:]], dim=1)
        scores = [self.processed(candidate[:, : past + 1 + i], logits[i]) for i in range(len(fed[0]))]
        kept = self.accept(drafts, draft_scores, scores)
        self.verifications += 1
        self.drafted += len(drafts)
        self.accepted += len(kept) - 1
        crop_cache(self.cache, past + len(kept))
        self.keep_features(hidden[:, : len(kept)])
        return self.emit(sequence, kept, list(logits[: len(kept)]), scores[: len(kept)])

    def draft(self, sequence: torch.LongTensor, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Up to `length` tokens, one at a time, stopping after one whose top probability is below the threshold:
        the tokens and the draft's processed scores for each."""
        drafts, draft_scores = [], []
        for _ in range(length):
            scores = self.processed(sequence, self.next_draft_logits(sequence))
            drafts.append(self.choose(scores))
            draft_scores.append(scores)
            sequence = torch.cat([sequence, drafts[-1].view(1, 1)], dim=1)
            if self.threshold and torch.softmax(scores, dim=-1).max() < self.threshold:
                break
        return drafts, draft_scores

    def next_draft_logits(self, sequence: torch.LongTensor) -> torch.Tensor:
        """The draft's logits (vocab) of the token after `sequence`: the exit after `self.depth` blocks, on the last
        token (whose exit state the verification reuses)."""
        with record_function("speculative::draft_blocks"):
            self.exit_hidden.append(self.run_blocks(sequence[:, -1:], 0, self.depth))
        with record_function("speculative::draft_head"):
            return self.draft_head(self.exit_hidden[-1])[0]

    def verify(self, fed: torch.LongTensor) -> torch.Tensor:
        """The last block's output (1 x n x H) on `fed`, the last emitted token and the drafts: the blocks after the
        exit, on the exit states the draft made (and the last draft's, made here)."""
        with record_function("speculative::draft_blocks"):
            self.exit_hidden.append(self.run_blocks(fed[:, -1:], 0, self.depth))
        with record_function("speculative::verify_blocks"):
            hidden = self.run_blocks(fed, self.depth, len(self.blocks), torch.cat(self.exit_hidden, dim=1))
        self.exit_hidden = []
        return hidden

    def keep_features(self, hidden: torch.Tensor) -> None:
        """What the draft keeps of the full model's last-block outputs (1 x n x H) of the tokens just verified (or of
        the prompt): nothing, for an exit."""

    def accept(
        self, drafts: list[torch.Tensor], draft_scores: list[torch.Tensor], scores: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The drafted tokens kept and the full model's token after them (`scores`: one more than `drafts`)."""
        if not self.generation.do_sample:
            kept = []
            for draft, target in zip(drafts, scores):
                if draft != target.argmax(-1):
                    break
                kept.append(draft)
            return [*kept, scores[len(kept)].argmax(-1)]
        return speculative_sampling(drafts, draft_scores, scores)

    def emit(
        self,
        sequence: torch.LongTensor,
        tokens: list[torch.Tensor],
        logits: list[torch.Tensor],
        scores: list[torch.Tensor],
    ) -> tuple[torch.LongTensor, bool]:
        """Append `tokens` one by one until a stopping criterion holds; stream them. Returns the sequence and
        whether generation is over."""
        done = False
        for count, (token, raw, score) in enumerate(zip(tokens, logits, scores), start=1):
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
            self.raw_logits.append(raw.unsqueeze(0))
            self.scores.append(score.unsqueeze(0))
            done = bool(self.stopping(sequence, score.unsqueeze(0)).all())
            if done:
                break
        if self.streamer is not None:
            self.streamer.put(sequence[0, -count:].cpu())
        return sequence, done

    def output(self, sequence: torch.LongTensor) -> SelfSpeculativeOutput:
        generation = self.generation
        return SelfSpeculativeOutput(
            sequences=sequence,
            scores=tuple(self.scores) if generation.output_scores else None,
            logits=tuple(self.raw_logits) if generation.output_logits else None,
            cache=self.cache,
            verifications=self.verifications,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            draft_depth=self.depth,
        )


class DraftUnitDecoder(SelfSpeculativeDecoder):
    """Speculative decoding with the model's draft unit (`generate(..., use_draft_unit=True)`), batch 1.

    The draft unit reads the full model's top features of every verified token with its next token, and then its
    own predicted features, one drafted token at a time, with a cache of its own; the full model verifies every
    drafted token in one pass from the embeddings up. After each verification the unit's cache drops what it computed
    from its own predictions, and the next round first feeds it the verified features (EAGLE's scheme). It drafts
    over the unit's own vocabulary (`config.draft_vocabulary_size`) unless `draft_vocabulary` is given.
    """

    unit_cache: DynamicCache | None = None
    pending: torch.Tensor | None = None  # the full model's top features of verified tokens the unit has not read
    verified = 0  # the entries of the unit's cache made from verified features (the rest from its own predictions)
    predicted: torch.Tensor | None = None  # the draft unit's last predicted feature, during a draft

    def draft_blocks(self) -> int:
        """The draft runs no backbone block."""
        return 0

    def own_vocabulary(self) -> torch.LongTensor | None:
        """The unit's own vocabulary (`config.draft_vocabulary_size`), or None: every token."""
        return self.model.draft_unit.checked_vocabulary()

    def draft_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """The unit predicts top features, which the LM head reads as they are."""
        return hidden

    def keep_features(self, hidden: torch.Tensor) -> None:
        if self.unit_cache is None:
            self.unit_cache = DynamicCache()
        crop_cache(self.unit_cache, self.verified)
        features = self.model.top_features(hidden)
        self.pending = features if self.pending is None else torch.cat([self.pending, features], dim=1)
        self.predicted = None

    def next_draft_logits(self, sequence: torch.LongTensor) -> torch.Tensor:
        """The draft unit on the verified features it has not read yet (first draft of a round) or on its own last
        prediction, each with the token after it; its prediction through the LM head."""
        with record_function("speculative::draft_unit"):
            past = self.unit_cache.get_seq_length()
            if self.predicted is None:
                features, self.pending = self.pending, None
                self.verified += features.shape[1]
            else:
                features = self.predicted
            length = features.shape[1]
            predicted = self.model.draft_unit_features(
                features, sequence[:, -length:], self.mask[:, : past + length], self.unit_cache
            )
            self.predicted = predicted[:, -1:]
        with record_function("speculative::draft_head"):
            return self.draft_head(self.predicted)[0]

    def verify(self, fed: torch.LongTensor) -> torch.Tensor:
        """Every block on `fed`, from the embeddings: the draft ran none."""
        with record_function("speculative::verify_blocks"):
            return self.run_blocks(fed, 0, len(self.blocks))


def speculative_sampling(
    drafts: list[torch.Tensor], draft_scores: list[torch.Tensor], scores: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Leviathan et al.'s rule: keep drafted token x (drawn from q) with probability min(1, p(x) / q(x)); at the
    first rejection draw from max(0, p - q) normalised instead; after all kept, draw the next token from p. The
    tokens then follow p, the full model's distribution."""
    kept = []
    for draft, draft_score, score in zip(drafts, draft_scores, scores):
        p, q = torch.softmax(score, dim=-1), torch.softmax(draft_score, dim=-1)
        if torch.rand(()) * q[draft] < p[draft]:
            kept.append(draft)
            continue
        residual = (p - q).clamp(min=0)
        return [*kept, torch.multinomial(residual / residual.sum(), 1)[0]]
    return [*kept, torch.multinomial(torch.softmax(scores[len(kept)], dim=-1), 1)[0]]
