"""The training loss: next-token cross-entropy, mixed with logit distillation when there is a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions, times T² (Hinton et al.)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def compute_loss(model, teacher, ids: torch.Tensor, o) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, LM loss, KD loss or None) of ``model`` on the sequences ``ids``."""
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
