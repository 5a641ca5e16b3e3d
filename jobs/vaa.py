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
from typing import Callable, Iterator

import numpy as np
import torch

from jobs.train import IGNORE, collate_numpy

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


def grad_norm(grads) -> torch.Tensor:
    """‖g‖₂ over all trainable parameters, accumulated in float64."""
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if g is not None:
            sq += g.detach().double().pow(2).sum()
    return sq.sqrt()


# --- how each strategy reaches the whole gradient and the weights -------------------------


class PlainBackend:
    """One process, or DDP: every rank holds whole parameters and (after backward) the
    rank-averaged gradient, so the global norm is a local computation."""

    def __init__(self, model, optimizer, schedule, grad_clip: float, world: int = 1):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.grad_clip, self.world = grad_clip, world
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, batch: dict, n_tokens: int) -> torch.Tensor:
        return self.model(**batch, num_items_in_batch=n_tokens).loss

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world).backward()  # DDP averages over ranks; the global batch sum wants a sum

    def full_grads(self) -> Iterator[torch.Tensor]:
        return (p.grad for p in self.params)

    def perturb(self, scale: float) -> list[torch.Tensor]:
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=scale)
        return saved

    def distance(self, saved: list[torch.Tensor]) -> float:
        """‖θ − saved‖₂ over all trainable parameters: the perturbation actually applied."""
        return grad_norm(p.detach() - s for p, s in zip(self.params, saved)).item()

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Clip, step, schedule; returns the norm of the gradient that drove the step (before clipping)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip).item()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        self.zero_grad()
        return norm


class ZeroBackend(PlainBackend):
    """DeepSpeed ZeRO-2/3: gradients live partitioned across ranks and, under ZeRO-3, so do the
    weights. `safe_get_full_grad` assembles one parameter's averaged gradient at a time (a
    collective every rank joins in the same order), so no rank ever holds the whole gradient."""

    def __init__(self, engine, zero_stage: int, world: int):
        super().__init__(engine, None, None, 0.0, world)
        self.engine, self.stage = engine, zero_stage
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world)

    def full_grads(self) -> Iterator[torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return (safe_get_full_grad(p) for p in self.params)

    def perturb(self, scale: float) -> list[torch.Tensor]:
        if self.stage < 3:  # weights are whole on every rank
            saved = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, g in zip(self.params, self.full_grads()):
                    p.add_(g, alpha=scale)
            return saved
        import deepspeed

        # Keep only this rank's partition of θ; gather one parameter at a time to move it.
        saved = [p.ds_tensor.detach().clone() for p in self.params]
        for p, g in zip(self.params, self.full_grads()):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if torch.distributed.get_rank() == 0:
                    p.add_(g.view_as(p), alpha=scale)
        return saved

    def distance(self, saved: list[torch.Tensor]) -> float:
        if self.stage < 3:
            return super().distance(saved)
        # Each rank holds one partition of θ: the squared distance is a sum over ranks.
        local = grad_norm(p.ds_tensor.detach() - s for p, s in zip(self.params, saved)) ** 2
        local = local.to(self.params[0].ds_tensor.device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(local)
        return local.sqrt().item()

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                (p.ds_tensor if self.stage == 3 else p).copy_(s)

    def zero_grad(self) -> None:
        # The optimizer's zero_grad also resets ZeRO's micro-step count, so the perturbed
        # backward overwrites the first gradient instead of accumulating onto it.
        self.engine.optimizer.zero_grad()

    def step(self) -> float:
        self.engine.step()  # clips (gradient_clipping), steps, schedules
        return float(self.engine.get_global_grad_norm())


# --- the step and the loop ---------------------------------------------------------------


def count_target_tokens(batch: dict) -> int:
    """Tokens the shifted causal-LM loss scores (labels after the first position)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


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


def group_stream(batches_for: Callable[[int], Iterator[dict]], name: str) -> Iterator[dict]:
    """One group's global batches, cycling: pass c of the group reshuffles with its own seed."""
    cycle = 0
    while True:
        n = 0
        for batch in batches_for(cycle):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"group '{name}' has fewer rows than one batch")
        cycle += 1


def train_vaa(backend: PlainBackend, batches_for: Callable[[int, int, int], Iterator[dict]], cfg: dict,
              sampler: GroupSampler, rank: int = 0, world: int = 1, start_epoch: int = 0,
              sum_ranks: Callable[[float], float] = lambda x: x, on_epoch=None, progress=None,
              history: dict | None = None) -> dict:
    """E epochs of VAA steps. `batches_for(group, epoch, cycle)` yields global batches of numpy
    columns; every rank reads the same ones and keeps rows [rank·micro, (rank+1)·micro), so the
    global batch does not depend on the world size. Epoch e restarts every group's stream with
    seeds of its own, so a run resumed from an epoch checkpoint continues exactly; `history` is
    the resumed run's history so far (from its checkpoint), which the returned one extends."""
    steps_per_epoch, epochs = cfg["steps_per_epoch"], cfg["epochs"]
    micro = cfg["batch_size"] // world
    groups = (INVULNERABLE,) if sampler.mode == "none" else (VULNERABLE, INVULNERABLE)
    history = {k: v.copy() if isinstance(v, list) else v for k, v in history.items()} if history else {
        **{k: [] for k in ("loss", "group", "q", "lambda", "eps_norm", "grad_norm")}, "tokens_per_rank": 0}
    for epoch in range(start_epoch, epochs):
        streams = {g: group_stream(lambda c, g=g, e=epoch: batches_for(g, e, c), GROUP_NAMES[g]) for g in groups}
        for step in range(steps_per_epoch):
            lam_t = lambda_at(epoch * steps_per_epoch + step, steps_per_epoch, epochs, cfg["lam"])
            g = sampler.group()
            perturb = sampler.perturb(lam_t)
            rows = next(streams[g])
            local = {k: v[rank * micro:(rank + 1) * micro] for k, v in rows.items()}
            batch = collate_numpy(local, cfg["pad_id"], cfg["max_len"])
            n_tokens = int(sum_ranks(float(count_target_tokens(batch))))
            out = vaa_step(backend, batch, n_tokens, cfg["rho"], perturb, sum_ranks)
            sampler.observe(g, out["loss"], cfg["eta"], tuple(cfg["q_clip"]))
            for k, v in (("loss", out["loss"]), ("group", g), ("q", sampler.q), ("lambda", lam_t),
                         ("eps_norm", out["eps_norm"]), ("grad_norm", out["grad_norm"])):
                history[k].append(v)
            history["tokens_per_rank"] += int(batch["attention_mask"].sum())
            done = (epoch - start_epoch) * steps_per_epoch + step + 1
            if progress and (done % 10 == 0 or step + 1 == steps_per_epoch):
                progress(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch, out["loss"])
        if on_epoch:
            on_epoch(epoch, history)
    return history


def initial_q(cfg: dict, n_vulnerable: int, n_total: int) -> float:
    """q₀: 0.5 (uniform over groups) or the vulnerable group's share of the examples."""
    return 0.5 if cfg["q_init"] == "uniform" else n_vulnerable / max(1, n_total)


SAMPLER_MODES = {"vaa": "dro", "vaa-importance": "importance", "vaa-sam": "none",
                 "vaa-vulnerable": "vulnerable", "vaa-invulnerable": "invulnerable"}
