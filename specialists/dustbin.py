"""The model side of a specialist: its head with a dustbin class and its prior correction.

A specialist for a group S has the generalist's architecture and weights and a new head of
|S| + 1 outputs: the classes of S (in sorted order) and a dustbin that stands for every class
outside S.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import torch
from torch import nn

from .errors import SpecialistsError
from .models import get_classifier

__all__ = [
    "build_specialist",
    "group_hash",
    "prior_offsets",
    "project_to_group",
]


def group_hash(classes: list[int], generalist_sha256: str) -> str:
    """Identity of a specialist's task: its classes and the generalist it starts from."""
    payload = json.dumps(
        {"classes": sorted(int(c) for c in classes), "generalist": generalist_sha256}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def project_to_group(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, K) distribution over all classes -> (B, |S| + 1): the classes of S, then the mass outside S."""
    inside = probs[:, classes]
    return torch.cat([inside, (1.0 - inside.sum(1, keepdim=True)).clamp_min(0.0)], dim=1)


def prior_offsets(target_prior: float, train_fraction: float, n_group: int) -> np.ndarray:
    """Logit offsets that move a specialist trained with a share ``train_fraction`` of its group
    to a world where the group's share is ``target_prior`` (Bayes' rule):
    log(pi / f) on every class of S and log((1 - pi) / (1 - f)) on the dustbin. (|S| + 1,)"""
    pi = float(np.clip(target_prior, 1e-6, 1 - 1e-6))
    f = float(np.clip(train_fraction, 1e-6, 1 - 1e-6))
    out = np.full(n_group + 1, math.log(pi / f))
    out[-1] = math.log((1 - pi) / (1 - f))
    return out


@torch.no_grad()
def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def build_specialist(
    generalist: nn.Module,
    classes: list[int],
    *,
    sample: torch.Tensor | None = None,
    head_init: str = "copy",
    seed: int = 0,
) -> nn.Module:
    """A copy of ``generalist`` with an |S| + 1 head.

    ``head_init="copy"``: the rows of S are the generalist's, so at step 0 the specialist's
    distribution over S (renormalised) is exactly the generalist's; the dustbin row is the least-
    squares fit, on the pre-logit features of ``sample`` (transformed inputs), of the log of the
    generalist's summed probability outside S, so its initial dustbin probability approximates
    the generalist's mass outside S. ``"random"`` keeps a fresh head (the default; see docs/design.md,
    "Findings that set the defaults").
    """
    if head_init not in ("copy", "random"):
        raise SpecialistsError(f"head_init must be copy or random, got {head_init!r}")
    model = copy.deepcopy(generalist)
    old = get_classifier(model)
    idx = torch.as_tensor(sorted(classes), dtype=torch.long)
    torch.manual_seed(seed)
    model.reset_classifier(len(idx) + 1)
    new = get_classifier(model)
    new.to(old.weight.device, old.weight.dtype)
    if head_init == "random":
        return model
    new.weight[: len(idx)] = old.weight[idx]
    new.bias[: len(idx)] = old.bias[idx] if old.bias is not None else 0.0
    outside = torch.ones(old.out_features, dtype=torch.bool)
    outside[idx] = False
    if sample is None or not outside.any():
        # Without data: the log-sum-exp of the outside rows, linearised at the origin.
        new.weight[-1] = old.weight[outside].mean(0) if outside.any() else 0.0
        new.bias[-1] = torch.logsumexp(old.bias[outside], 0) if outside.any() else -10.0
        return model
    was_training = generalist.training
    generalist.eval()
    h = _pre_logits(generalist, sample).double()  # (N, D)
    target = torch.logsumexp(old(h.to(old.weight.dtype)).double()[:, outside], dim=1)  # (N,)
    generalist.train(was_training)
    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)  # (N, D + 1)
    ridge = 1e-3 * torch.eye(design.shape[1], dtype=h.dtype)
    coef = torch.linalg.solve(design.T @ design + ridge, design.T @ target)  # (D + 1,)
    new.weight[-1] = coef[:-1].to(new.weight.dtype)
    new.bias[-1] = coef[-1].to(new.bias.dtype)
    return model
