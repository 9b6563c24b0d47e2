"""The fast path of the loss-based criteria: the calibration loss of many cuts of one model, without
redoing what a cut cannot change.

A cut that removes the layer at position p of the kept layers leaves every layer before p untouched, so
their inputs are the same for every candidate: :class:`LayerRunner` keeps the input of every kept layer for
the calibration batches (computed once per greedy step) and runs each candidate only from the removed
layer on. Each layer is called with the arguments the backbone passes it (attention masks, rotary position
embeddings, ...), captured by a pre-hook during one real forward pass of the full model, per layer: a layer
keeps its own arguments wherever it runs in a cut model, as it keeps its own attention type (Gemma's
sliding-window and global layers get different masks and rotary tables; ``surgery.remove_layers`` renumbers
``config.layer_types`` so that each layer keeps its type). The LM head runs only where a loss is needed,
in chunks of positions, so no full-vocabulary logits of all positions exist at once.

The calibration loss is the mean next-token NLL over every predicted token of the calibration sequences
(each sequence's tokens 1..T-1, predicted from the tokens before them; no packing).

A greedy step needs only the best candidate's loss, and a small model's LM head costs as much as many of its
layers (SmolLM2-135M: 49,152 x 576, about eight layers per token; Gemma 3 270M: 262,144 x 640, about thirty), so
each candidate first gets an exact *lower bound* of its loss from a subset of the vocabulary: the
log-sum-exp over a subset (plus the target) is at most the one over the whole vocabulary. The subset is the
eighth of the vocabulary that holds the most probability under the current model for that batch; the cut
models stay close to it, so the bound is tight (within ~1 % of the loss on SmolLM2) and only the candidates
whose bound does not exceed the best complete loss pay for the full head (2-3 of 30 per step on SmolLM2).
The choice is the same as with every candidate's full loss. Float32 and float64 models only: the rounding of
half-precision logits is larger than the bound's slack could absorb.

Before any of this is used the runner checks itself on the model: its logits for a short sequence must
equal the model's own forward pass, so an architecture whose forward does more than its layers, final norm
and LM head (with Gemma's logit soft-capping) is refused instead of ranked wrongly.

Import this module only inside a criterion's ``select``: it imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data import collate
from ..errors import DepthpruneError
from ..model.capture import accepts, watch_layers
from ..model.load import decoder_layout

# The states of every kept layer for every batch are kept in memory when they fit in this many bytes;
# beyond it each batch's states are recomputed per step and candidates run batch by batch.
STATE_BUDGET_BYTES = 3 * 2**30
HEAD_CHUNK = 512  # positions per LM-head chunk: (chunk, vocab) float32 logits at a time
SUBSET_DIVISOR = 8  # the loss bound uses 1/SUBSET_DIVISOR of the vocabulary
BOUND_MARGIN = 1e-4  # relative: a candidate is dropped only when its bound exceeds the best loss by more


class LayerRunner:
    """Calls a model's decoder layers on the calibration batches with the arguments its backbone gives them.

    ``layers`` are the model's layers in their original order; a cut is named by the original indices of
    the layers it keeps.
    """

    def __init__(self, model, sequences: Sequence[Sequence[int]], *, batch_size: int = 8, pad_token_id: int = 0,
                 progress: bool = False):
        if not sequences:
            raise DepthpruneError("no calibration sequences to measure")
        if any(len(s) < 2 for s in sequences):
            raise DepthpruneError("every calibration sequence needs at least 2 tokens for a next-token loss")
        self.model = model
        self.layout = decoder_layout(model)
        self.layers = list(self.layout.layers)
        self.progress = progress
        first = next(self.layers[0].parameters())
        self.device, self.dtype = first.device, first.dtype
        parent_path = self.layout.layers_path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        project_out = getattr(parent, "project_out", None)  # OPT's projection after the final norm
        self.project_out = project_out if isinstance(project_out, torch.nn.Module) else None
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.pass_positions = accepts(self.layout.backbone, "position_ids")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: less padding
        ordered = [sequences[i] for i in order]
        self.batches = [collate(ordered[s : s + batch_size], pad_token_id, "right").to(self.device)
                        for s in range(0, len(ordered), batch_size)]
        self.num_predicted = sum(len(s) - 1 for s in sequences)
        self.num_tokens = sum(len(s) for s in sequences)
        self._check_path()
        self.embeddings, self.calls, self.targets = [], [], []
        full = 0.0
        for batch in self.batches:
            embedding, calls, last = self._capture(batch)
            self.embeddings.append(embedding)
            self.calls.append(calls)
            mask = batch.attention_mask.bool()
            rows, cols = torch.nonzero(mask[:, :-1] & mask[:, 1:], as_tuple=True)
            self.targets.append((rows, cols, batch.input_ids[rows, cols + 1]))
            full += self.nll_sum(last, len(self.targets) - 1)
        self.full_loss = full / self.num_predicted
        self.state_bytes = self.num_tokens * embedding.shape[-1] * embedding.element_size()

    # -------------------------------------------------------------------------------------------- capture

    def _capture(self, batch, call=None):
        """One real forward pass: every layer's input (the first one kept) and arguments, and the last
        layer's output. ``call``: the forward to run (default: the backbone, no LM head)."""
        calls: list = [None] * len(self.layers)
        captured: dict = {}

        def on_input(index, hidden, layer_call):
            calls[index] = layer_call
            if index == 0:
                captured["embedding"] = hidden.detach()

        def on_last_output(hidden):
            captured["last"] = hidden.detach()

        kwargs = {"position_ids": batch.position_ids} if self.pass_positions else {}
        with torch.no_grad(), watch_layers(self.layers, on_input, on_last_output):
            result = (call or self.layout.backbone)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                    use_cache=False, **kwargs)
        if any(c is None for c in calls):
            raise DepthpruneError(f"{type(self.model).__name__}: not every decoder layer ran in the forward pass")
        return captured["embedding"], calls, captured["last"] if call is None else (captured["last"], result)

    def _check_path(self) -> None:
        """The runner's logits for a short sequence equal the model's own forward pass, or the model is refused."""
        batch = self.batches[0]
        short = collate([batch.input_ids[0, : min(12, int(batch.attention_mask[0].sum()))].tolist()], 0).to(self.device)
        embedding, calls, (_, result) = self._capture(short, call=self.model)
        saved = getattr(self, "calls", None)
        self.calls = [calls]
        try:
            with torch.no_grad():
                hidden = self.run(range(len(self.layers)), 0, embedding, 0)
                mine = self._logits(hidden[0])
        finally:
            self.calls = saved
        reference = result.logits[0].float()
        scale = max(1.0, float(reference.abs().max()))
        tolerance = (1e-3 if self.dtype == torch.float32 else 5e-2) * scale
        if mine.shape != reference.shape or float((mine - reference).abs().max()) > tolerance:
            raise DepthpruneError(f"the loss-based criteria cannot run {type(self.model).__name__}: its forward pass does "
                                  "more than its decoder layers, final norm and LM head; use similarity, "
                                  "block-influence or deepest")

    # -------------------------------------------------------------------------------------------- running

    def call(self, index: int, hidden: torch.Tensor, b: int) -> torch.Tensor:
        """Layer ``index`` (original numbering) on ``hidden`` of batch ``b``, with the arguments it got."""
        return self.calls[b][index].replay(self.layers[index], hidden)

    def run(self, kept: Sequence[int], start: int, hidden: torch.Tensor, b: int) -> torch.Tensor:
        """Run the kept layers from position ``start`` on (``hidden`` is the input of that position)."""
        for index in list(kept)[start:]:
            hidden = self.call(index, hidden, b)
        return hidden

    def states(self, kept: Sequence[int], b: int) -> list[torch.Tensor]:
        """The input of every kept layer, and the last one's output, for batch ``b``."""
        states = [self.embeddings[b]]
        for index in kept:
            states.append(self.call(index, states[-1], b))
        return states

    def _head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of some positions' last hidden states: what the LM head multiplies."""
        if self.layout.final_norm is not None:
            hidden = self.layout.final_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, projection, LM head and soft-capping of some positions' last hidden states, in float32."""
        return self._capped(self.layout.lm_head(self._head_input(hidden))).float()

    def _nll_sum(self, hidden: torch.Tensor, b: int) -> float:
        """The summed next-token NLL of batch ``b`` from its last layer's output, the LM head in chunks."""
        rows, cols, targets = self.targets[b]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, len(rows), HEAD_CHUNK):
            logits = self._logits(hidden[rows[s : s + HEAD_CHUNK], cols[s : s + HEAD_CHUNK]])
            picked = logits.gather(1, targets[s : s + HEAD_CHUNK, None])[:, 0]
            total += (torch.logsumexp(logits, dim=-1) - picked).sum(dtype=torch.float64)
        return float(total)

    def nll_sum(self, hidden: torch.Tensor, b: int) -> float:
        with torch.no_grad():
            return self._nll_sum(hidden, b)

    def can_bound(self) -> bool:
        """Whether the vocabulary-subset bound applies: a plain linear LM head in float32 or float64."""
        head = self.layout.lm_head
        return (type(head) is torch.nn.Linear and head.weight.dtype in (torch.float32, torch.float64)
                and head.weight.shape[0] >= 2 * SUBSET_DIVISOR)

    def vocabulary_subsets(self, last: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, from the current model's last-layer outputs ``last``: the token ids of the 1/8 of the
        vocabulary with the most probability summed over the predicted positions, and for each predicted
        position whether its target is among them."""
        subsets = []
        for b, hidden in enumerate(last):
            rows, cols, targets = self.targets[b]
            mass = None
            for s in range(0, len(rows), HEAD_CHUNK):
                logits = self._logits(hidden[rows[s : s + HEAD_CHUNK], cols[s : s + HEAD_CHUNK]])
                chunk = torch.softmax(logits, dim=-1).sum(0)
                mass = chunk if mass is None else mass + chunk
            subset = torch.topk(mass, -(-mass.numel() // SUBSET_DIVISOR)).indices
            subsets.append((subset, torch.isin(targets, subset)))
        return subsets

    def _nll_lower_bound(self, hidden: torch.Tensor, b: int, subset: tuple[torch.Tensor, torch.Tensor]) -> float:
        """A lower bound of :meth:`_nll_sum`: each position's log-sum-exp over the subset and its target only
        (dropping the other tokens' exp terms, all positive, can only lower it)."""
        rows, cols, targets = self.targets[b]
        ids, target_in = subset
        head = self.layout.lm_head
        weight, bias = head.weight[ids], (head.bias[ids] if head.bias is not None else None)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, len(rows), HEAD_CHUNK):
            x = self._head_input(hidden[rows[s : s + HEAD_CHUNK], cols[s : s + HEAD_CHUNK]])
            t = targets[s : s + HEAD_CHUNK]
            picked = (x * head.weight[t]).sum(-1) + (head.bias[t] if head.bias is not None else 0)
            picked = self._capped(picked).float()
            lse = torch.logsumexp(self._capped(torch.nn.functional.linear(x, weight, bias)).float(), dim=-1)
            lse = torch.where(target_in[s : s + HEAD_CHUNK], lse, torch.logaddexp(lse, picked))
            total += (lse - picked).sum(dtype=torch.float64)
        return float(total)

    # -------------------------------------------------------------------------------------------- losses

    @torch.no_grad()
    def removal_losses(self, kept: Sequence[int], candidates: Sequence[int], *, exhaustive: bool,
                       hint: dict | None = None, desc: str = "candidates", states: list | None = None,
                       reuse: dict | None = None, record: dict | None = None) -> dict[int, float | None]:
        """The calibration loss of the cut without each candidate layer (original indices, all in ``kept``).

        ``exhaustive=False`` (a greedy step needs only the best candidate): a candidate stops as soon as its
        partial sum of NLLs (never decreasing: each NLL is >= 0), or first of their vocabulary-subset lower
        bounds, exceeds the best complete one, and its value is then None. ``hint``: earlier losses, to try
        the likely best candidates first. ``states``: the inputs of the kept layers per batch
        (:meth:`states`), when already known.

        ``reuse[(c, b)]``: the inputs of the kept layers at positions p+1 … m of the cut without candidate c,
        known from an earlier step (the layers between c and the layer removed since are the same), so c runs
        from position m on. ``record``: filled with the same for every candidate run here (while they fit in
        the memory budget), for the next step.
        """
        kept = list(kept)
        position = {index: p for p, index in enumerate(kept)}
        losses: dict[int, float | None] = {}
        bar = tqdm(total=len(candidates), unit="cut", desc=desc, disable=not self.progress, leave=False)
        fits = self.state_bytes * (len(kept) + 1) <= STATE_BUDGET_BYTES
        try:
            if not fits:  # batch by batch: every candidate complete, states recomputed per batch
                order = list(candidates)
                sums = dict.fromkeys(order, 0.0)
                for b in range(len(self.batches)):
                    batch_states = self.states(kept, b)
                    for c in order:
                        p = position[c]
                        sums[c] += self._nll_sum(self.run(kept, p + 1, batch_states[p], b), b)
                    bar.update(len(order) / len(self.batches))
                return {c: s / self.num_predicted for c, s in sums.items()}
            states = states or [self.states(kept, b) for b in range(len(self.batches))]
            order = self._likely_best_first(candidates, position, states[0], hint)
            subsets = None if exhaustive or not self.can_bound() else self.vocabulary_subsets([s[-1] for s in states])
            best, budget = math.inf, [STATE_BUDGET_BYTES - self.state_bytes * (len(kept) + 1)]

            def outputs(c):  # the cut without c, batch by batch, from the latest known input on
                for b in range(len(self.batches)):
                    known = dict((reuse or {}).get((c, b)) or {position[c] + 1: states[b][position[c]]})
                    yield self._run_recording(kept, known, b, record, (c, b), budget)

            for c in order:
                total = self._candidate_sum(outputs(c), math.inf if exhaustive else best, subsets)
                losses[c] = None if total is None else total / self.num_predicted
                if total is not None:
                    best = min(best, total)
                bar.update(1)
        finally:
            bar.close()
        return losses

    def _candidate_sum(self, runs, best: float, subsets: list | None) -> float | None:
        """A candidate's summed NLL from ``runs`` (its last layer's output per batch, computed as consumed), or
        None as soon as it cannot beat ``best`` (a summed NLL; inf: keep every candidate). With ``subsets`` the
        vocabulary-subset bound is summed first, and only a candidate that passes it pays for the full head."""
        total, outputs = 0.0, []
        for b, hidden in enumerate(runs):
            if subsets is None:
                total += self._nll_sum(hidden, b)
                if total > best * (1 + 1e-9):  # every NLL is >= 0: the rest can only add
                    return None
            else:
                total += self._nll_lower_bound(hidden, b, subsets[b])
                if total > best * (1 + BOUND_MARGIN):
                    return None
                outputs.append(hidden)
        if subsets is not None:
            total = 0.0
            for b, hidden in enumerate(outputs):
                total += self._nll_sum(hidden, b)
                if total > best * (1 + 1e-9):
                    return None
        return total

    def _run_recording(self, kept: list, known: dict, b: int, record: dict | None, key, budget: list) -> torch.Tensor:
        """Run the kept layers from the last known input on; with ``record``, keep every input (position ->
        tensor; ``len(kept)``: the output) while the budget lasts. Returns the last layer's output."""
        start = max(known)
        hidden = known[start]
        for j in range(start, len(kept)):
            hidden = self.call(kept[j], hidden, b)
            known[j + 1] = hidden
        if record is not None and budget[0] > 0:
            budget[0] -= (len(kept) - start) * hidden.numel() * hidden.element_size()
            record[key] = known
        return hidden

    def _likely_best_first(self, candidates, position: dict, states: list[torch.Tensor], hint: dict | None) -> list:
        """Candidates in the order to try them: by ``hint`` (earlier losses) when given, else by how little
        each layer changes its input on the first batch (1 - cos), so the bound is tight early."""
        if hint:
            return sorted(candidates, key=lambda c: (math.inf if hint.get(c) is None else hint[c], c))
        mask = self.batches[0].attention_mask.bool()
        change = {c: 1 - float(torch.nn.functional.cosine_similarity(
            states[position[c]][mask].float(), states[position[c] + 1][mask].float(), dim=-1).mean())
            for c in candidates}
        return sorted(candidates, key=lambda c: (change[c], c))


def runner_for(context) -> LayerRunner:
    """The context's runner, made once per context (a sweep's: once per sweep)."""
    from ..data import pad_id

    runner = context.cache.get("runner")
    if runner is None:
        pad = pad_id(context.tokenizer) if context.tokenizer is not None else 0
        runner = LayerRunner(context.model, context.sequences, batch_size=context.batch_size, pad_token_id=pad,
                             progress=context.progress)
        context.cache["runner"] = runner
    return runner


def best_of(losses: dict[int, float | None]) -> int:
    """The candidate with the lowest complete loss, the lowest layer on ties."""
    return min((loss, c) for c, loss in losses.items() if loss is not None)[1]


def greedy_order(context, n: int) -> dict:
    """SLEB's greedy removal order, extended to ``n`` layers (cached in the context: each n takes a prefix).

    Returns ``{"order": [...], "losses": [loss after each removal], "full_loss": ...}``. Between steps it
    keeps each candidate's run: after layer w (at position q) goes, a candidate c before it needs none of the
    layers between c and w again (their inputs are unchanged), only those after w; and the inputs of the new
    model's layers are the winner's run.
    """
    runner = runner_for(context)
    state = context.cache.setdefault("greedy", {"order": [], "losses": [], "full_loss": runner.full_loss})
    hint = state.get("hint", context.cache.get("oneshot"))
    total = len(runner.layers)
    while len(state["order"]) < n:
        kept = [i for i in range(total) if i not in state["order"]]
        runs: dict = {}
        states = None
        if not state["order"] and hint is not None and all(v is not None for v in hint.values()):
            losses = hint  # the one-shot scores are the first greedy step
        else:
            fits = runner.state_bytes * (len(kept) + 1) <= STATE_BUDGET_BYTES
            states = (state.get("states") or [runner.states(kept, b) for b in range(len(runner.batches))]) \
                if fits else None
            losses = runner.removal_losses(kept, kept, exhaustive=False, hint=hint, states=states,
                                           reuse=state.get("reuse"), record=runs,
                                           desc=f"perplexity-greedy step {len(state['order']) + 1}")
        best = best_of(losses)
        if not state["order"]:
            context.cache.setdefault("greedy_first_step", losses)
        state["order"].append(best)
        state["losses"].append(losses[best])
        state["hint"] = hint = losses
        state["states"], state["reuse"] = _next_step(kept, best, states, runs)
    return state


def _next_step(kept: list, winner: int, states: list | None, runs: dict):
    """What the next greedy step can start from: the inputs of the layers of the model without ``winner``
    (the current ones before it, then the winner's run), and for each candidate c before the winner its
    recorded inputs up to the layer after the winner (the layers between c and the winner are unchanged)."""
    q = kept.index(winner)
    reuse = {(c, b): {j: known[j] for j in range(kept.index(c) + 1, q + 1)}
             for (c, b), known in runs.items() if c != winner and kept.index(c) < q}
    batches = range(len(states or []))
    if states is None or not all((winner, b) in runs for b in batches):
        return None, reuse
    return [states[b][:q] + [runs[(winner, b)][j] for j in range(q + 1, len(kept) + 1)] for b in batches], reuse


def oneshot_losses(context) -> dict[int, float]:
    """Every layer's calibration loss with only that layer removed (cached in the context)."""
    losses = context.cache.get("oneshot")
    if losses is None:
        runner = runner_for(context)
        total = len(runner.layers)
        known = {c: v for c, v in (context.cache.get("greedy_first_step") or {}).items() if v is not None}
        missing = [c for c in range(total) if c not in known]
        found = runner.removal_losses(range(total), missing, exhaustive=True, desc="perplexity-oneshot") if missing \
            else {}
        losses = {c: known.get(c, found.get(c)) for c in range(total)}
        context.cache["oneshot"] = losses
    return losses
