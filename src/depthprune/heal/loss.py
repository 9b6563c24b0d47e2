"""The training loss: next-token cross-entropy, mixed with logit distillation when there is a teacher.

The vocabulary projection is where a small model's step spends its memory and much of its time: the
float32 logits of a batch are ``positions x vocabulary`` (8 x 512 positions of SmolLM2's 49,152-token
vocabulary: 805 MB, and autograd keeps several such tensors). :func:`compute_loss` therefore runs the
model with its output layer skipped (a pre-hook hands the layer zero positions, so it computes nothing;
the call still goes through the model's forward and any DDP wrapper) and projects the final hidden
states itself, ``loss_chunk`` positions at a time, as Liger's fused linear cross-entropy does: each
chunk's logits give the chunk's losses and, at once, their gradients with respect to the hidden states
(and to the output weights when those train), so no logits outlive their chunk and nothing is
recomputed. The teacher's logits are projected chunk by chunk beside the student's, under no_grad.
Arithmetic and result are those of the plain loss (:func:`plain_loss`, ``loss_chunk=0``) up to float
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100

# Causal LMs whose logits are exactly their output layer applied to the final hidden states (Gemma 2/3:
# then soft-capped, handled below). Others (e.g. Granite's and Cohere's logit scaling) use the plain loss.
FUSABLE_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi", "phi3", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neox", "opt", "olmo", "olmo2", "starcoder2", "stablelm", "smollm3",
})


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions, times T² (Hinton et al.)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def compute_loss(model, teacher, ids: torch.Tensor, o) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, LM loss, KD loss or None) of ``model`` on the sequences ``ids``.

    ``o.loss_chunk`` positions at a time through the output layer (see the module's text); 0, or a model
    whose logits are not a plain linear layer of its last hidden states, takes :func:`plain_loss`.
    """
    chunk = getattr(o, "loss_chunk", 0)
    head = output_head(model) if chunk else None
    teacher_head = output_head(teacher) if head is not None and teacher is not None else None
    if head is None or (teacher is not None and teacher_head is None):
        return plain_loss(model, teacher, ids, o)
    hidden = final_hidden_states(model, ids, head)
    if teacher is None:
        # The last position predicts nothing: leave it out of the projection altogether.
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        loss, lm, _ = linear_losses(hidden, head, ids[:, 1:].reshape(-1), chunk=chunk)
        return loss, lm, None
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, ids.to(input_device(teacher)), teacher_head)
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), IGNORE)], dim=1).reshape(-1)
    return linear_losses(hidden.reshape(-1, hidden.shape[-1]), head, targets, chunk=chunk,
                         teacher_hidden=teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_head=teacher_head,
                         kd_weight=o.kd_weight, temperature=o.kd_temperature)


def plain_loss(model, teacher, ids: torch.Tensor, o) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss from the model's full logits, all positions at once (as Hugging Face computes it)."""
    logits = model(input_ids=ids, use_cache=False).logits
    lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if teacher is None:
        return lm, lm, None
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids.to(input_device(teacher)), use_cache=False).logits
    kd = distillation_loss(logits, teacher_logits.to(logits.device), o.kd_temperature)
    return (1 - o.kd_weight) * lm + o.kd_weight * kd, lm, kd


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


# ---------------------------------------------------------------------------------- the output layer


@dataclass(frozen=True)
class Head:
    """A causal LM's output layer: logits = softcap(hidden @ weight.T + bias)."""

    module: nn.Linear
    softcap: float | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden`` (rows of final hidden states), as the model computes them."""
        logits = F.linear(hidden.to(self.weight.device), self.weight, self.bias).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_head(model) -> Head | None:
    """The output layer of ``model`` (unwrapped from DDP and peft) when its logits are a plain linear layer
    of the final hidden states; None otherwise (then the plain loss is used)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES or not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    # Exactly nn.Linear: not a LoRA-wrapped or 4-bit head, nor one sharded away from its [vocab, hidden] shape.
    if type(head) is not nn.Linear or head.weight.dim() != 2 or head.weight.shape[0] != config.vocab_size:
        return None
    return Head(head, getattr(config, "final_logit_softcapping", None))


def final_hidden_states(model, ids: torch.Tensor, head: Head) -> torch.Tensor:
    """Run ``model`` (through its wrappers' forward) on ``ids`` with the output layer skipped; returns the
    hidden states the output layer would have projected, [batch, positions, hidden]."""
    captured: list[torch.Tensor] = []

    def skip(module, args):
        captured.append(args[0])
        return (args[0].narrow(-2, 0, 0), *args[1:])  # zero positions: no logits computed

    handle = head.module.register_forward_pre_hook(skip)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def linear_losses(hidden: torch.Tensor, head: Head, targets: torch.Tensor, *, chunk: int,
                  teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None,
                  kd_weight: float = 0.0, temperature: float = 1.0):
    """(loss, LM loss, KD loss or None) of the rows ``hidden`` [N, H] projected by ``head``, ``chunk`` rows at
    a time: LM = mean cross-entropy over the rows whose ``targets`` are not -100; with a teacher, KD = mean
    over all rows of KL(teacher || student) at ``temperature``, times T², and loss = (1 - w) LM + w KD. Only
    ``loss`` carries gradients (to ``hidden`` and, when they train, the head's weight and bias)."""
    distil = teacher_hidden is not None
    loss, lm, kd = _LinearLosses.apply(
        hidden, head.weight, head.bias, targets, head.softcap, chunk,
        teacher_hidden, teacher_head.weight if distil else None, teacher_head.bias if distil else None,
        teacher_head.softcap if distil else None, kd_weight, temperature)
    return loss, lm, (kd if distil else None)


class _LinearLosses(torch.autograd.Function):
    """The losses and, in the same pass over each chunk of rows, their gradients (scaled in backward by the
    incoming gradient of the loss): no logits are kept and none recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, t_hidden, t_weight, t_bias, t_softcap,
                kd_weight, temperature):
        distil = t_hidden is not None
        rows = hidden.shape[0]
        valid = targets != IGNORE
        ce_rows = valid.sum().clamp_min(1)
        # d loss / d logits = a (softmax - onehot) on the rows with a target + b (p_student,T - p_teacher,T)
        a = ((1.0 - kd_weight) if distil else 1.0) / ce_rows.float()
        b = kd_weight * temperature / rows
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want = want_h or want_w or want_b
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        student, teacher = Head(_Weights(weight, bias), softcap), Head(_Weights(t_weight, t_bias), t_softcap)
        fast = weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk]
            z = student.logits(h)  # [c, V] float32
            target = targets[start : start + chunk]
            ok = valid[start : start + chunk]
            picked = target.clamp_min(0).unsqueeze(1)
            lse = torch.logsumexp(z, dim=-1)
            ce_sum += ((lse - z.gather(1, picked).squeeze(1)) * ok).sum()
            if not want:
                if distil:
                    kd_sum += _kl(z, teacher.logits(t_hidden[start : start + chunk]).to(z.device), temperature)[0]
                continue
            capped = z.clone() if softcap is not None else None
            if distil:  # before z becomes the softmax
                t = teacher.logits(t_hidden[start : start + chunk]).to(z.device)
                kl, kd_grad = _kl(z, t, temperature)
                kd_sum += kl
            grad = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, picked, -ok.to(grad.dtype).unsqueeze(1))  # - onehot(target)
            scale = (ok * a).unsqueeze(1)  # per row; rows without a target: 0
            if distil:
                grad.mul_(scale).add_(kd_grad.mul_(b))
                scale = None
            if softcap is not None:  # z = c tanh(l / c): dz/dl = 1 - (z / c)²
                grad.mul_(1 - (capped / softcap) ** 2)
            if scale is not None and (softcap is not None or not fast):
                grad.mul_(scale)
                scale = None
            # Without distillation or soft-capping the per-row scale goes on the small [c, H] side.
            grad = grad.to(weight.dtype)
            if want_h:
                gh = grad @ weight.to(grad.device)
                grad_h[start : start + chunk] = gh if scale is None else gh.mul_(scale)
            if want_w:
                hs = h if scale is None else h * scale.to(h.dtype)
                if fast:
                    grad_w.addmm_(grad.t(), hs)
                else:
                    grad_w += (grad.t() @ hs).float()
            if want_b:
                grad_b += (grad.float() if scale is None else grad.float() * scale).sum(0)
        lm = ce_sum / ce_rows
        kd = kd_sum * temperature**2 / rows
        loss = (1 - kd_weight) * lm + kd_weight * kd if distil else lm.clone()
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(lm, kd)
        return loss, lm, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_lm, _grad_kd):
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None, None)


def _kl(z: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of KL(teacher || student) at ``temperature``, p_student - p_teacher)."""
    log_s = F.log_softmax(z / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    p_t = log_t.exp()
    kl = (p_t * (log_t - log_s)).sum()
    return kl, log_s.exp_().sub_(p_t)


@dataclass(frozen=True)
class _Weights:
    """Stands in for an nn.Linear inside the autograd function (its tensors, without the module)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
