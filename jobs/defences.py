"""The baseline defences of SCIENCE.md §9 as steps of the one training loop (`jobs/train_loop.py`):
Vaccine, Booster and RepNoise train an aligned model; Lisa changes how the user's fine-tuning runs.

Each is written once against the backend interface (`jobs/backends.py`), so one process, DDP and
ZeRO give the same numbers (Booster: one process and DDP; see `BoosterStep`). What keeps them rank-free: every loss is a part of a global-batch
sum (each rank divides by the global token count), every norm is summed over ranks before it is
used, and RepNoise draws its Gaussian noise per row from the row's place in the global batch.
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from typing import Callable

import torch

from jobs.backends import PlainBackend, grad_norm
from jobs.train import IGNORE

SumRanks = Callable[[float], float]


# --- decoder hidden states ---------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM (`…model.layers` in Llama, Qwen, Mistral), found through
    any DDP, DeepSpeed or PEFT wrapper."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return list(module)
    raise ValueError(f"{type(model).__name__} has no `layers` list of decoder blocks")


@contextmanager
def layer_outputs(model: torch.nn.Module, edit: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                  keep_grad: bool = False):
    """Every decoder block's output hidden states of the forwards run inside, in layer order
    (`edit(layer, h)` replaces them; `keep_grad` keeps their gradient after a backward)."""
    seen: list[torch.Tensor] = []

    def hook(layer: int, out):
        h = out[0] if isinstance(out, tuple) else out  # blocks return a tensor or (tensor, ...)
        if edit is not None:
            h = edit(layer, h)
        if keep_grad and h.requires_grad:
            h.retain_grad()
        seen.append(h)
        if edit is not None:
            return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [block.register_forward_hook(lambda _m, _args, out, i=i: hook(i, out))
               for i, block in enumerate(decoder_layers(model))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def squared_norm(tensors) -> float:
    return sum(float(t.detach().double().pow(2).sum()) for t in tensors)


# --- Vaccine ------------------------------------------------------------------------------


class VaccineStep:
    """Perturbation-aware alignment: the gradient with respect to every decoder block's output
    e_l gives ε_l = ρ·∇_{e_l}ℓ / ‖∇_e ℓ‖ (one norm over all blocks and the global batch); the
    step takes the gradient of ℓ with e_l + ε_l in place of e_l. Two forward/backward passes."""

    streams = ("all",)

    def __init__(self, cfg: dict, steps_per_epoch: int):
        self.rho = cfg["rho"]

    def choose(self, t: int) -> str:
        return "all"

    def take(self, backend: PlainBackend, batch: dict, n_tokens: int, sum_ranks: SumRanks) -> dict:
        with layer_outputs(backend.module, keep_grad=True) as hidden:
            loss = backend.forward(batch, n_tokens)
        backend.backward(loss)
        grads = [h.grad for h in hidden]
        # Each rank's gradients are the world size times its share of the global gradient; the
        # direction is all ε needs, and the norm over ranks is the global batch's norm.
        norm = math.sqrt(sum_ranks(squared_norm(grads)))
        eps = [(self.rho / (norm + 1e-12)) * g.detach() for g in grads]
        backend.zero_grad()
        added: list[torch.Tensor] = []

        def perturb(layer: int, h: torch.Tensor) -> torch.Tensor:
            shifted = h + eps[layer].to(h.dtype)
            added.append((shifted - h).detach())  # what was added, measured on the hidden states
            return shifted

        with layer_outputs(backend.module, edit=perturb):
            perturbed = backend.forward(batch, n_tokens)
        backend.backward(perturbed)
        return {"loss": sum_ranks(loss.item()), "perturbed_loss": sum_ranks(perturbed.item()),
                "eps_norm": math.sqrt(sum_ranks(squared_norm(added))), "grad_norm": backend.step()}

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


# --- Booster ------------------------------------------------------------------------------


class BoosterStep:
    """Attenuating harmful perturbation: the gradient of f(w) + λ·[h(w) − h(w − α·∇h/‖∇h‖)], with f
    the alignment loss and h the loss on a batch of the harmful alignment-time set. Three passes,
    accumulated in the backend's own gradient buffers (no gradient copy):
    λ∇h(w) at w; −λ∇h(w') at the shifted w', then w restored exactly; ∇f(w) at w."""

    streams = ("all", "harmful")

    def __init__(self, cfg: dict, steps_per_epoch: int):
        self.lam, self.alpha = cfg["lam"], cfg["alpha"]

    def choose(self, t: int) -> tuple[str, str]:
        return ("all", "harmful")

    def take(self, backend: PlainBackend, batches: dict, n_tokens: dict, sum_ranks: SumRanks) -> dict:
        harmful, n_h = batches["harmful"], n_tokens["harmful"]
        out = {}
        if self.lam > 0:
            h = backend.forward(harmful, n_h)
            backend.backward(self.lam * h)
            # The buffers hold λ∇h: scaling them by −α/‖λ∇h‖ moves w by −α·∇h/‖∇h‖.
            saved = backend.perturb(-self.alpha / (grad_norm(backend.full_grads()).item() + 1e-12))
            shift = backend.distance(saved)
            h_shifted = backend.forward(harmful, n_h)
            backend.backward(-self.lam * h_shifted, accumulate=True)
            backend.restore(saved)  # w exactly, before the alignment gradient and the optimizer
            out = {"harmful_loss": sum_ranks(h.item()), "harmful_loss_shifted": sum_ranks(h_shifted.item()),
                   "shift_norm": shift}
        f = backend.forward(batches["all"], n_tokens["all"])
        backend.backward(f, accumulate=self.lam > 0)
        return {"loss": sum_ranks(f.item()), **out, "grad_norm": backend.step()}

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


# --- RepNoise -----------------------------------------------------------------------------


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, spread: float = 2.0) -> torch.Tensor:
    """The (biased) squared MMD between samples x and y under a sum of Gaussian kernels whose
    bandwidths spread around the mean squared distance of the pooled samples."""
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).pow(2)
    n = len(pooled)
    base = d2.detach().sum() / (n * n - n) / spread ** (kernels // 2)
    k = sum(torch.exp(-d2 / (base * spread ** i)) for i in range(kernels))
    m = len(x)
    return k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean()


def noise_seed(seed: int, t: int, position: int) -> int:
    return zlib.crc32(f"repnoise/{seed}/{t}/{position}".encode()) & 0x7FFFFFFF


def noise_mmd(hidden: list[torch.Tensor], batch: dict, seed: int, t: int) -> torch.Tensor:
    """Σ over this rank's rows of the mean over decoder blocks of MMD²(the row's target-token hidden
    states, as many draws of N(0, I)); each row's draws depend only on its place in the global batch."""
    total = hidden[0].new_zeros((), dtype=torch.float32)
    targets = batch["labels"] != IGNORE
    for i, position in enumerate(batch["position"].tolist()):
        idx = targets[i].nonzero().squeeze(1)
        if len(idx) < 2:
            continue
        g = torch.Generator().manual_seed(noise_seed(seed, t, position))
        for h in hidden:
            x = h[i, idx].float()
            noise = torch.randn(x.shape, generator=g).to(x.device)
            total = total + gaussian_mmd(x, noise) / len(hidden)
    return total


class RepNoiseStep:
    """Representation noising: ℓ_harmless + β·MMD(harmful hidden states, N(0, I)) − α·log ℓ_harmful,
    on a batch of the alignment set and one of the harmful alignment-time set; the harmful loss is
    ascended, its log bounding the ascent. One backward over both forwards."""

    streams = ("all", "harmful")

    def __init__(self, cfg: dict, steps_per_epoch: int):
        self.beta, self.alpha, self.seed, self.batch_size = cfg["beta"], cfg["alpha"], cfg["seed"], cfg["batch_size"]
        self.t = 0

    def choose(self, t: int) -> tuple[str, str]:
        self.t = t
        return ("all", "harmful")

    def take(self, backend: PlainBackend, batches: dict, n_tokens: dict, sum_ranks: SumRanks) -> dict:
        harmless = backend.forward(batches["all"], n_tokens["all"])
        with layer_outputs(backend.module) as hidden:
            harmful_part = backend.forward(batches["harmful"], n_tokens["harmful"])
        harmful = sum_ranks(harmful_part.item())  # ℓ_harmful of the global batch
        mmd_part = noise_mmd(hidden, batches["harmful"], self.seed, self.t) / self.batch_size
        # ∇ log ℓ_harmful = ∇ℓ_harmful / ℓ_harmful: each rank's part of the sum, over the global value.
        backend.backward(harmless + self.beta * mmd_part - self.alpha * harmful_part / harmful)
        harmless_g, mmd = sum_ranks(harmless.item()), sum_ranks(mmd_part.item())
        return {"loss": harmless_g + self.beta * mmd - self.alpha * math.log(harmful), "harmless_loss": harmless_g,
                "harmful_loss": harmful, "mmd": mmd, "grad_norm": backend.step()}

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


# --- Lisa ---------------------------------------------------------------------------------


class LisaStep:
    """Lazy safety alignment during the user's fine-tuning: `align_steps` steps on alignment rows,
    then `finetune_steps` on the user's rows, and again; in both states the loss adds
    ρ/2·‖w − w̃‖², w̃ the weights at the last switch (the run's start counts as one). As in the
    paper's code, the proximal term starts after the first `prox_after` of the steps."""

    streams = ("all", "alignment")

    def __init__(self, cfg: dict, steps_per_epoch: int):
        self.rho, self.k_align, self.k_finetune = cfg["rho"], cfg["align_steps"], cfg["finetune_steps"]
        self.prox_from = cfg["prox_after"] * steps_per_epoch * cfg["epochs"]
        self.current, self.anchor, self.t, self.next = None, None, 0, None

    def choose(self, t: int) -> str:
        self.t = t
        self.next = "alignment" if t % (self.k_align + self.k_finetune) < self.k_align else "all"
        return self.next

    def take(self, backend: PlainBackend, batch: dict, n_tokens: int, sum_ranks: SumRanks) -> dict:
        state = self.next
        if state != self.current:  # a switch: w̃ is the weights now
            self.current, self.anchor = state, [p.detach().clone() for p in backend.params]
        elif self.anchor[0].device != backend.params[0].device:  # loaded from a checkpoint, on the CPU
            self.anchor = [a.to(p.device) for a, p in zip(self.anchor, backend.params)]
        loss = backend.forward(batch, n_tokens)
        proximal = loss.new_zeros(())
        if self.rho > 0 and self.t >= self.prox_from:
            proximal = self.rho / 2 * sum((p - a).pow(2).sum() for p, a in zip(backend.params, self.anchor))
        # Every rank holds whole weights and the same term: its 1/world share sums to the term once.
        backend.backward(loss + proximal / backend.world)
        return {"loss": sum_ranks(loss.item()), "proximal": float(proximal.detach()), "aligning": int(state == "alignment"),
                "grad_norm": backend.step()}

    def state(self) -> dict:
        return {"current": self.current, "tensors": self.anchor}

    def load(self, state: dict) -> None:
        self.current, self.anchor = state["current"], state.get("tensors")


DEFENCE_STEPS = {"vaccine": VaccineStep, "booster": BoosterStep, "repnoise": RepNoiseStep, "lisa": LisaStep}
