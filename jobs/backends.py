"""How a training step reaches the whole gradient and the weights under each strategy: one
process or DDP (`PlainBackend`), DeepSpeed ZeRO-2/3 (`ZeroBackend`), and how a model is wrapped
for its strategy (`prepare_strategy`). Every step of SCIENCE.md (SFT, VAA, the defences) is
written once against this interface, so it gives the same numbers under every strategy."""

from __future__ import annotations

import os
from typing import Iterator

import torch

from jobs.models import apply_lora
from jobs.train import make_optimizer, make_schedule


MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


def model_inputs(batch: dict) -> dict:
    """What the model reads of a batch (the loop adds each row's place in the global batch)."""
    return {k: batch[k] for k in MODEL_INPUTS}


def grad_norm(grads) -> torch.Tensor:
    """‖g‖₂ over all trainable parameters, accumulated in float64 (on the CPU: some devices have no float64)."""
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if g is not None:
            sq += g.detach().double().pow(2).sum().cpu()
    return sq.sqrt()


class PlainBackend:
    """One process, or DDP: every rank holds whole parameters and (after backward) the
    rank-averaged gradient, so the global norm is a local computation."""

    def __init__(self, model, optimizer, schedule, grad_clip: float, world: int = 1, bf16: bool = False):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.grad_clip, self.world, self.bf16 = grad_clip, world, bf16
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The plain model: DDP wraps it (only with more than one worker), one process does not.
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.module = model.module if ddp else model

    def forward(self, batch: dict, n_tokens: int) -> torch.Tensor:
        """The loss summed over this rank's target tokens, divided by the global batch's `n_tokens`."""
        device = batch["input_ids"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(**model_inputs(batch), num_items_in_batch=n_tokens).loss.float()

    def backward(self, loss: torch.Tensor, accumulate: bool = False) -> None:
        """Gradients of `loss` into the buffers; with `accumulate`, added to those already there
        (a step that sums several backwards, as Booster's). Plain buffers always add up."""
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

    def close(self) -> None:
        """Let go of what the run holds, so the next run of a worker group starts clean."""
        self.optimizer = self.schedule = None

    def full_state_dict(self, rank: int) -> dict | None:
        """The whole model's weights in float32 on the CPU, on rank 0 (None elsewhere)."""
        if rank != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


class ZeroBackend(PlainBackend):
    """DeepSpeed ZeRO-2/3: gradients live partitioned across ranks and, under ZeRO-3, so do the
    weights. `safe_get_full_grad` assembles one parameter's averaged gradient at a time (a
    collective every rank joins in the same order), so no rank ever holds the whole gradient."""

    def __init__(self, engine, zero_stage: int, world: int):
        super().__init__(engine, None, None, 0.0, world)
        self.engine, self.stage, self.module = engine, zero_stage, engine.module
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def close(self) -> None:
        self.engine.destroy()  # DeepSpeed keeps hooks and buffers registered until told

    def forward(self, batch: dict, n_tokens: int) -> torch.Tensor:
        return self.engine(**model_inputs(batch), num_items_in_batch=n_tokens).loss.float()  # the engine casts for bf16

    def backward(self, loss: torch.Tensor, accumulate: bool = False) -> None:
        # ZeRO-2 keeps only the last backward's gradient before a step (measured,
        # tests/test_defences.py); ZeRO-3 adds a backward to the earlier ones once a forward has
        # come between them (its micro-step count moves at the forward), and copies otherwise.
        # Where DeepSpeed would not add, hold the earlier gradient and add it back: under ZeRO-3
        # a rank's own partition; under ZeRO-2, whose weights are whole on every rank, the whole
        # gradient (the local fragment API is ZeRO-3's only).
        adds = self.stage == 3 and self.engine.optimizer.micro_step_id > 0
        held = self._gradients() if accumulate and not adds else None
        self.engine.backward(loss * self.world)
        if held is not None:
            for p, h, g in zip(self.params, held, self._gradients()):
                self._set_gradient(p, g + h)

    def _gradients(self) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        get = safe_get_local_grad if self.stage == 3 else safe_get_full_grad
        return [get(p).clone() for p in self.params]

    def _set_gradient(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        (safe_set_local_grad if self.stage == 3 else safe_set_full_grad)(p, value)

    def full_grads(self) -> Iterator[torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return (safe_get_full_grad(p) for p in self.params)

    def perturb(self, scale: float) -> list[torch.Tensor]:
        if self.stage < 3:  # weights are whole on every rank
            saved = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, g in zip(self.params, self.full_grads()):
                    p.add_(g.to(p.dtype), alpha=scale)
            return saved
        import deepspeed

        # Keep only this rank's partition of θ; gather one parameter at a time to move it.
        saved = [p.ds_tensor.detach().clone() for p in self.params]
        for p, g in zip(self.params, self.full_grads()):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if torch.distributed.get_rank() == 0:
                    p.add_(g.view_as(p).to(p.dtype), alpha=scale)
        return saved

    def distance(self, saved: list[torch.Tensor]) -> float:
        if self.stage < 3:
            return super().distance(saved)
        # Each rank holds one partition of θ: the squared distance is a sum over ranks.
        local = grad_norm(p.ds_tensor.detach() - s for p, s in zip(self.params, saved)) ** 2
        from deepspeed.accelerator import get_accelerator

        local = local.to(get_accelerator().current_device_name())  # NCCL reduces device tensors only (offload: CPU)
        torch.distributed.all_reduce(local)
        return local.sqrt().item()

    def restore(self, saved: list[torch.Tensor]) -> None:
        if self.stage < 3:
            return super().restore(saved)
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.ds_tensor.copy_(s)
                # A parameter DeepSpeed still holds whole (the small ones it keeps gathered, and
                # any the last pass left so) would keep its moved value until the step re-gathers
                # it; a forward before the step (Booster's alignment pass) would see it. Release
                # it, so the next forward gathers it from the restored partitions.
                if p.ds_status == ZeroParamStatus.AVAILABLE:
                    p.partition()

    def zero_grad(self) -> None:
        # Through DeepSpeed's optimizer wrapper, which clears its own gradient buffers (and under
        # ZeRO-3 its micro-step count), so the perturbed backward overwrites the first gradient.
        self.engine.optimizer.zero_grad()

    def step(self) -> float:
        self.engine.step()  # clips (gradient_clipping), steps, schedules
        return float(self.engine.get_global_grad_norm())

    def full_state_dict(self, rank: int) -> dict | None:
        if self.stage < 3:
            return super().full_state_dict(rank)
        import deepspeed

        # A collective: every rank gathers each parameter in turn; rank 0 keeps a CPU copy.
        state = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    state[name] = p.detach().float().cpu().clone()
        return state if rank == 0 else None


# --- wrapping a model for its strategy ----------------------------------------------------


def deepspeed_config(cfg: dict, micro_batch: int, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.get("grad_clip", 1.0),
        "zero_optimization": {"stage": cfg["zero_stage"], **_offload(cfg.get("offload", "none"))},
        # One torch AdamW in every strategy, so that strategies compare like for like.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload with that torch optimizer, not DeepSpeed's CPU Adam
        "bf16": {"enabled": cfg.get("bf16", False)},
        "steps_per_print": 10**9,
    }


def _offload(offload: str) -> dict:
    """The ZeRO-3 CPU-offload presets: optimizer states, or optimizer states and parameters."""
    out = {}
    if offload in ("optimizer", "params"):
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "params":
        out["offload_param"] = {"device": "cpu", "pin_memory": True}
    return out


def prepare_strategy(cfg: dict, model, micro: int, world: int, total_steps: int, distributed: bool = True):
    """The backend of `model` wrapped for cfg['strategy'] (DDP through Ray Train, or a DeepSpeed
    engine), with its optimizer and schedule. `distributed=False`: one plain process (tests, bench)."""
    if cfg.get("lora", {}).get("enabled"):
        model = apply_lora(model, cfg["lora"])
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule(optimizer, cfg, total_steps)
    if cfg.get("strategy", "ddp") != "deepspeed" or not distributed:
        if distributed:
            import ray.train.torch

            model = ray.train.torch.prepare_model(model)  # moves it to the worker's device; DDP when world > 1
        return PlainBackend(model, optimizer, schedule, cfg.get("grad_clip", 1.0), world, cfg.get("bf16", False))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed as ds

    engine, _, _, _ = ds.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                    config=deepspeed_config(cfg, micro, world), dist_init_required=False)
    return ZeroBackend(engine, cfg["zero_stage"], world)
