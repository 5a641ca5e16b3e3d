"""The VAA group-DRO step of SCIENCE.md §5, the same numbers in one process, DDP or ZeRO-2/3.

Per optimizer step: draw a group g ~ Bernoulli(q), take that group's next global batch (each
rank keeps its slice); with probability λ_t perturb the weights SAM-style (ε = ρ·∇ℓ/‖∇ℓ‖),
take the gradient at θ+ε, restore θ exactly, and step; then move q by an importance-weighted
exponentiated-gradient step on the rank-averaged loss. Every random draw comes from one
seeded generator, so data-parallel ranks that share the seed draw the same group and coin.

Why the numbers agree across strategies: the loss is the token-weighted mean over the whole
global batch (each rank divides its token sum by the global token count), so the gradient
DDP and DeepSpeed average across ranks is exactly the one-process gradient of the same batch.
The gradient whose norm scales ε is that averaged, global gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jobs.backends import PlainBackend, grad_norm

VULNERABLE, INVULNERABLE = 1, 0
GROUP_NAMES = {VULNERABLE: "vulnerable", INVULNERABLE: "invulnerable"}


def lambda_at(step: int, steps_per_epoch: int, epochs: int, lam: float) -> float:
    """λ_t = λ · e_t / E with e_t the fractional epoch before step t (steps done / steps per
    epoch, as the paper's code reads `state.epoch`): a linear ramp from 0 towards λ, so about
    half of all steps perturb (SCIENCE.md §5)."""
    return lam * (step / steps_per_epoch) / epochs


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

    def state(self) -> dict:
        return {"q": self.q, "rng": self.rng.bit_generator.state}

    def load(self, state: dict) -> None:
        self.q = state["q"]
        self.rng.bit_generator.state = state["rng"]


# --- the step and the loop ---------------------------------------------------------------


def vaa_step(backend: PlainBackend, batch: dict, n_tokens: int, rho: float, perturb: bool,
             sum_ranks: Callable[[float], float] = lambda x: x) -> dict:
    """One optimizer step; returns the global loss that drives q (at θ+ε when perturbed), ‖ε‖ as
    measured on the weights, and the norm of the gradient the optimizer stepped with."""
    loss = backend.forward(batch, n_tokens)
    backend.backward(loss)
    eps_norm = 0.0
    if perturb:
        norm = grad_norm(backend.full_grads()).item()
        saved = backend.perturb(rho / (norm + 1e-12))
        eps_norm = backend.distance(saved)
        backend.zero_grad()
        loss = backend.forward(batch, n_tokens)  # ℓ(θ + ε): its gradient drives the step and its value drives q
        backend.backward(loss)
        backend.restore(saved)  # θ exactly, before the optimizer moves it
    step_grad_norm = backend.step()
    return {"loss": sum_ranks(loss.item()), "eps_norm": eps_norm, "grad_norm": step_grad_norm}


class VAAStep:
    """The VAA step for the training loop (`jobs/steps.py`): which group's stream the next batch
    comes from, whether it is perturbed, and the q update after it. cfg: rho, lam, eta, q_clip,
    q0, mode (a `GroupSampler` mode), epochs, seed."""

    def __init__(self, cfg: dict, steps_per_epoch: int):
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.sampler = GroupSampler(cfg["seed"], q=cfg["q0"], mode=cfg["mode"])
        self.streams = ("all",) if cfg["mode"] == "none" else (GROUP_NAMES[VULNERABLE], GROUP_NAMES[INVULNERABLE])
        self._drawn = None

    def choose(self, t: int) -> str:
        lam_t = lambda_at(t, self.steps_per_epoch, self.cfg["epochs"], self.cfg["lam"])
        group = self.sampler.group()
        self._drawn = (group, lam_t, self.sampler.perturb(lam_t))  # group first, then the coin: one draw order
        return "all" if self.cfg["mode"] == "none" else GROUP_NAMES[group]

    def take(self, backend: PlainBackend, batch: dict, n_tokens: int, sum_ranks: Callable[[float], float]) -> dict:
        group, lam_t, perturb = self._drawn
        out = vaa_step(backend, batch, n_tokens, self.cfg["rho"], perturb, sum_ranks)
        self.sampler.observe(group, out["loss"], self.cfg["eta"], tuple(self.cfg["q_clip"]))
        return {**out, "group": group, "q": self.sampler.q, "lambda": lam_t}

    def state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def load(self, state: dict) -> None:
        self.sampler.load(state["sampler"])


def initial_q(cfg: dict, n_vulnerable: int, n_total: int) -> float:
    """q₀: 0.5 (uniform over groups) or the vulnerable group's share of the examples."""
    return 0.5 if cfg["q_init"] == "uniform" else n_vulnerable / max(1, n_total)


def step_config(vaa: dict, mode: str, n_vulnerable: int, n_total: int) -> dict:
    """The VAA step's knobs from a spec's vaa section (a dump): the one place they are assembled."""
    knobs = {k: vaa[k] for k in ("rho", "lam", "eta", "q_init")}
    return {**knobs, "q_clip": list(vaa["q_clip"]), "mode": mode, "q0": initial_q(knobs, n_vulnerable, n_total)}


def recipe(vaa: dict, align: dict) -> dict:
    """VAA's training section: align_sft's (a dump) with VAA's own lr and epochs where set."""
    return {**align, "lr": vaa.get("lr") or align["lr"], "epochs": int(vaa.get("epochs") or align["epochs"])}


SAMPLER_MODES = {"vaa": "dro", "vaa-importance": "importance", "vaa-sam": "none",
                 "vaa-vulnerable": "vulnerable", "vaa-invulnerable": "invulnerable"}
