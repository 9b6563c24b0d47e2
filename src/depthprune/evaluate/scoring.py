"""Log-likelihoods of answer choices, the way lm-evaluation-harness defines them, computed fast.

A multiple-choice question is a prompt (``context``) and a few ``choices``; each choice is scored by
the summed log-probability of its tokens after the prompt. Tokenization follows lm-eval exactly:
trailing spaces move from the context to the choice, the context is ``encode(context)`` and the choice
is ``encode(context + choice)[len(context tokens):]``, both with the tokenizer's own special tokens.

Speed, without changing a single score:

* when every choice is one token (MMLU's " A".." D", BoolQ's " no"/" yes"), one forward pass over
  the prompt scores all choices at its last position;
* requests of one ``group`` (e.g. the questions of one MMLU subject, which share the k-shot prefix)
  share their longest common *token* prefix: it runs once, its KV cache is copied to each batch,
  and only each question's own tokens run on top of it. Sharing tokens, not text, keeps it exact
  even when a tokenizer merges across the prefix boundary (the shared part just gets shorter);
* rows are sorted by length and right-padded in batches, so little compute goes to padding;
* the vocabulary-wide LM head runs only at the scored positions, not at every token.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import pad_id
from ..errors import DepthpruneError
from ..model.capture import cache_argument
from ..model.load import decoder_layout, position_limit

DEFAULT_MAX_LENGTH = 2048


@dataclass
class ChoiceRequest:
    """One question: prompt tokens, the tokens of each choice, and the group whose prompts share a prefix."""

    context: list[int]
    continuations: list[list[int]]
    group: Hashable | None = None


@dataclass
class _Row:
    """One sequence to run: ``token_ids`` and the (request, choice, position, target token) entries scored on it."""

    token_ids: list[int]
    targets: list[tuple[int, int, int, int]]
    group: Hashable | None


def encode_choices(tokenizer, contexts: Sequence[str],
                   choices: Sequence[Sequence[str]]) -> list[tuple[list[int], list[list[int]]]]:
    """Token ids of each context and of its choices, exactly as lm-eval's ``_encode_pair`` makes them."""
    moved = []
    for context, options in zip(contexts, choices, strict=True):
        stripped = context.rstrip()
        spaces = context[len(stripped):]
        if not stripped:
            raise DepthpruneError("a prompt is empty: every question needs some context text")
        moved.append((stripped, [spaces + option for option in options]))
    context_ids = tokenizer([c for c, _ in moved], add_special_tokens=True)["input_ids"]
    wholes = tokenizer([c + o for c, options in moved for o in options], add_special_tokens=True)["input_ids"]
    out, at = [], 0
    for ctx, (_, options) in zip(context_ids, moved, strict=True):
        conts = [whole[len(ctx):] for whole in wholes[at : at + len(options)]]
        at += len(options)
        if any(not c for c in conts):
            raise DepthpruneError(f"a choice encodes to no tokens after its prompt: {options!r}")
        out.append((list(ctx), [list(c) for c in conts]))
    return out


def context_length(model, tokenizer=None) -> int:
    """The longest sequence the model takes: its config's position limit, else the tokenizer's, else 2048."""
    stated = position_limit(model.config)
    if stated is not None:
        return stated
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def _rows(requests: Sequence[ChoiceRequest], max_length: int) -> list[_Row]:
    rows = []
    for r, req in enumerate(requests):
        if all(len(c) == 1 for c in req.continuations):
            # All choices are one token: the logits at the prompt's last position score every choice.
            token_ids = list(req.context)
            targets = [(r, i, len(token_ids) - 1, c[0]) for i, c in enumerate(req.continuations)]
            rows.append(_Row(token_ids, targets, req.group))
            continue
        for i, cont in enumerate(req.continuations):
            token_ids = (req.context + cont)[:-1]
            start = len(req.context) - 1
            rows.append(_Row(token_ids, [(r, i, start + j, t) for j, t in enumerate(cont)], req.group))
    for row in rows:
        # Like lm-eval, keep the last max_length tokens of an over-long row (its scored tail survives).
        cut = len(row.token_ids) - max_length
        if cut > 0:
            row.token_ids = row.token_ids[cut:]
            row.targets = [(r, i, p - cut, t) for r, i, p, t in row.targets]
            if min(p for _, _, p, _ in row.targets) < 0:
                raise DepthpruneError(f"a choice is longer than the model's context of {max_length} tokens")
    return rows


def _common_prefix(rows: Sequence[_Row]) -> int:
    """Length of the longest token prefix shared by all rows, kept short of every scored position."""
    first = np.asarray(rows[0].token_ids)
    shared = min(p for row in rows for _, _, p, _ in row.targets)  # a scored position must run in the suffix
    for row in rows[1:]:
        n = min(shared, len(row.token_ids))
        differ = np.flatnonzero(first[:n] != np.asarray(row.token_ids[:n]))
        shared = int(differ[0]) if differ.size else n
        if shared == 0:
            break
    return shared


class _Scorer:
    """Runs batches through the model and returns log-softmax rows at chosen positions only."""

    def __init__(self, model, pad: int):
        self.model = model
        self.layout = decoder_layout(model)
        self.device = model.get_input_embeddings().weight.device
        self.pad = pad
        self.cache_arg = cache_argument(self.layout.backbone)
        self.own_head = self._own_head_matches()

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layout.lm_head(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def _own_head_matches(self) -> bool:
        # Applying the LM head ourselves skips the vocabulary projection at unscored positions. Some
        # models post-process logits in ways we do not know (scales, caps, hooks): check once on a short
        # input and fall back to the model's own forward (with logits_to_keep) if it differs.
        ids = torch.arange(1, 9, device=self.device)[None] % self.model.config.vocab_size
        reference = self.model(input_ids=ids, use_cache=False).logits[0, -1].float()
        hidden = self.layout.backbone(input_ids=ids, use_cache=False).last_hidden_state
        ours = self._head(hidden[0, -1])
        return torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * (1 + reference.abs().max().item()))

    @torch.no_grad()
    def prefix_cache(self, token_ids: list[int]):
        ids = torch.tensor([token_ids], device=self.device)
        out = self.layout.backbone(input_ids=ids, use_cache=True)
        return out[self.cache_arg] if self.cache_arg in out else out["past_key_values"]

    @torch.no_grad()
    def log_probs(self, seqs: Sequence[list[int]], where: list[tuple[int, int]], cache=None, offset: int = 0):
        """Log-softmax over the vocabulary at (row, position) pairs of right-padded ``seqs`` run after ``cache``
        (a prefix of ``offset`` tokens, shared by all rows)."""
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), offset + width), dtype=torch.long)
        mask[:, :offset] = 1
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, offset : offset + len(seq)] = 1
        positions = (offset + torch.arange(width)).expand(len(seqs), width)
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=positions.to(self.device))
        if cache is not None:
            cache = copy.deepcopy(cache)  # the prefix cache stays read-only for the next batch
            cache.batch_repeat_interleave(len(seqs))
            kwargs.update({self.cache_arg: cache, "use_cache": True})
        else:
            kwargs.update(use_cache=False)
        rows = torch.tensor([b for b, _ in where], device=self.device)
        cols = torch.tensor([p for _, p in where], device=self.device)
        if self.own_head:
            hidden = self.layout.backbone(**kwargs).last_hidden_state
            logits = self._head(hidden[rows, cols])
        else:
            keep, index = torch.unique(cols, return_inverse=True)
            logits = self.model(**kwargs, logits_to_keep=keep).logits[rows, index].float()
        return torch.log_softmax(logits, dim=-1)


def choice_loglikelihoods(model, tokenizer, requests: Sequence[ChoiceRequest], *, batch_size: int = 8,
                          max_length: int | None = None, progress: bool = True,
                          desc: str = "scoring") -> list[list[float]]:
    """Summed log-probability (nats) of each request's choices given its context; same order as ``requests``."""
    if batch_size < 1:
        raise DepthpruneError(f"batch size must be at least 1, got {batch_size}")
    max_length = max_length or context_length(model, tokenizer)
    scores = [[0.0] * len(req.continuations) for req in requests]
    rows = _rows(requests, max_length)
    scorer = _Scorer(model, pad_id(tokenizer))
    groups: dict[Hashable, list[_Row]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    # Rows alone in their group have nothing to share: they run together with the ungrouped ones.
    for key in [k for k, members in groups.items() if k is not None and len(members) == 1]:
        groups[None] += groups.pop(key)
    bar = tqdm(total=len(rows), unit="seq", desc=desc, disable=not progress)
    for key, members in groups.items():
        offset, cache = 0, None
        if key is not None:
            offset = _common_prefix(members)
            if offset > 0:
                cache = scorer.prefix_cache(members[0].token_ids[:offset])
        members = sorted(members, key=lambda row: -len(row.token_ids))
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            pairs = [(b, p - offset) for b, row in enumerate(batch) for _, _, p, _ in row.targets]
            where = list(dict.fromkeys(pairs))  # one-token choices share their position: one head row for all
            slot = {pair: i for i, pair in enumerate(where)}
            logprobs = scorer.log_probs([row.token_ids[offset:] for row in batch], where, cache, offset)
            entries = [entry for row in batch for entry in row.targets]
            picked = logprobs[torch.tensor([slot[pair] for pair in pairs]),
                              torch.tensor([t for *_, t in entries])].double().tolist()
            for (r, i, _, _), value in zip(entries, picked, strict=True):
                scores[r][i] += value
            bar.update(len(batch))
    bar.close()
    return scores
