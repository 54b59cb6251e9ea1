"""Knowledge distillation (Hinton et al. 2015): the student also matches a teacher's softened outputs.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task_loss

The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T changes. Positions the
task ignores (label -100, e.g. prompt tokens of instruction data) are left out of the soft term too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.errors import ConfigError


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    task_loss: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mix of the soft (teacher) and hard (task) losses; `labels` masks positions whose label is -100."""
    if temperature <= 0:
        raise ConfigError(f"The distillation temperature must be positive, got {temperature}.")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"The distillation weight alpha must be in [0, 1], got {alpha}.")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "the teacher must share the student's label set or vocabulary."
        )
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    if labels is not None and labels.shape == per_position.shape:
        keep = labels != -100
        soft = per_position[keep].mean() if keep.any() else per_position.sum() * 0
    else:
        soft = per_position.mean()
    return alpha * temperature**2 * soft + (1 - alpha) * task_loss
