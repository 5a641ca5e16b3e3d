"""The VAA group-DRO step of SCIENCE.md §5, in one process.

Per optimizer step: draw a group g ~ Bernoulli(q), take that group's next batch; with
probability λ_t perturb the weights SAM-style (ε = ρ·∇ℓ/‖∇ℓ‖), take the gradient at θ+ε,
restore θ exactly, and step; then move q by an importance-weighted exponentiated-gradient
step on the sampled group's loss. Every random draw comes from one seeded generator, so
data-parallel ranks that share the seed draw the same group and the same coin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

VULNERABLE, INVULNERABLE = 1, 0


def lambda_at(epoch: int, epochs: int, lam: float) -> float:
    """λ_t = λ · epoch / E, with epochs counted from 0: the first epoch is plain ERM (our reading)."""
    return lam * epoch / epochs


def update_q(q: float, group: int, loss: float, eta: float, clip: tuple[float, float] = (0.1, 0.9)) -> float:
    """Importance-weighted exponentiated-gradient step on q = P(draw the vulnerable group)."""
    if group == VULNERABLE:
        up = q * math.exp(eta * loss / q)
        q = up / (up + (1 - q))
    else:
        q = q / (q + (1 - q) * math.exp(eta * loss / (1 - q)))
    return min(max(q, clip[0]), clip[1])


@dataclass
class GroupSampler:
    """Which group each step trains on, for VAA and the paper's ablations.

    mode: "dro" (q moves with the losses), "importance" (q fixed at its start), "none" (no
    groups: one stream, always group 0), "vulnerable" / "invulnerable" (sample only one group).
    """

    seed: int
    q: float = 0.5
    mode: str = "dro"

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def group(self) -> int:
        if self.mode in ("none", "invulnerable"):
            return INVULNERABLE
        if self.mode == "vulnerable":
            return VULNERABLE
        return VULNERABLE if self.rng.random() < self.q else INVULNERABLE

    def perturb(self, lam_t: float) -> bool:
        return bool(self.rng.random() < lam_t)

    def observe(self, group: int, loss: float, eta: float, clip=(0.1, 0.9)) -> None:
        if self.mode == "dro":
            self.q = update_q(self.q, group, loss, eta, clip)


def grad_norm(params, all_reduce=None) -> torch.Tensor:
    """‖g‖₂ over all trainable parameters (and, given `all_reduce` summing across ranks, all ranks)."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            sq += p.grad.detach().double().pow(2).sum()
    if all_reduce is not None:
        all_reduce(sq)
    return sq.sqrt()


def vaa_step(model, batch: dict, optimizer, rho: float, perturb: bool, clip: float = 1.0) -> dict:
    """One optimizer step; returns the loss used for q (at θ+ε when perturbed) and ‖ε‖."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    eps_norm = 0.0
    if perturb:
        norm = grad_norm(params)
        scale = rho / (norm.item() + 1e-12)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=scale)
        eps_norm = rho if norm > 0 else 0.0
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss  # ℓ(θ + ε): its gradient drives the step and its value drives q
        loss.backward()
        with torch.no_grad():  # restore θ exactly before the optimizer moves it
            for p, s in zip(params, saved):
                p.copy_(s)
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return {"loss": loss.item(), "eps_norm": eps_norm}
