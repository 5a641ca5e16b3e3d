"""The baseline defences (`jobs/defences.py`) against references computed here by hand on a tiny
model in one process (plain SGD, no clipping, so a step is w − lr·g and g can be compared exactly),
and each alignment-stage defence in one process against 2-worker DDP on Ray Train."""

import copy
import math

import pandas as pd
import pytest
import ray
import torch

from jobs.backends import PlainBackend
from jobs.defences import (BoosterStep, LisaStep, RepNoiseStep, VaccineStep, decoder_layers, noise_seed)
from jobs.launch import controller_env, fit_group
from jobs.models import save_model, tiny_llama, train_tokenizer
from jobs.train import IGNORE, collate, count_target_tokens
from jobs.train_loop import row_streams

LR = 0.5  # large enough that a wrong gradient moves the weights visibly


@pytest.fixture()
def tiny(tmp_path):
    tok = train_tokenizer(["<|user|> say red <|assistant|> red red", "<|user|> say blue <|assistant|> blue"] * 5, 100,
                          tmp_path / "tok")
    torch.manual_seed(0)
    model = tiny_llama(dict(hidden=16, intermediate=32, layers=2, heads=2, max_len=32), tok)
    align = collate([[1, 5, 6, 7], [1, 5, 8, 7], [1, 6, 6]], [[9, 9, 2], [10, 2], [11, 12, 13, 2]], tok.pad_token_id, 32)
    harmful = collate([[1, 7, 5], [1, 8, 8, 6]], [[14, 15, 16, 2], [17, 18, 2]], tok.pad_token_id, 32)
    for batch in (align, harmful):
        batch["position"] = torch.arange(len(batch["input_ids"]))
    return model, align, harmful


def sgd_backend(model) -> PlainBackend:
    return PlainBackend(model, torch.optim.SGD(model.parameters(), lr=LR), None, grad_clip=1e9)


def lm_loss(model, batch):
    return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                 num_items_in_batch=count_target_tokens(batch)).loss


def expected_step(model, grads) -> list[torch.Tensor]:
    return [p.detach() - LR * g for p, g in zip(model.parameters(), grads)]


def assert_weights(model, expected, rtol=1e-4, atol=1e-6):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=rtol, atol=atol)


def run_with_outputs(model, batch, replace=None):
    """The loss, and every decoder block's output captured with hooks written here (`replace`:
    a list of tensors added to them)."""
    outs, handles = [], []
    for i, block in enumerate(decoder_layers(model)):
        def hook(_m, _a, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            if replace is not None:
                h = h + replace[i]
            outs.append(h)
            return ((h, *out[1:]) if isinstance(out, tuple) else h) if replace is not None else None
        handles.append(block.register_forward_hook(hook))
    try:
        return lm_loss(model, batch), outs
    finally:
        for h in handles:
            h.remove()


def test_vaccine_step_equals_the_hand_computed_one(tiny):
    """ε_l = ρ·g_l/‖g‖ with g the loss's gradient at each block's output (one norm over all
    blocks), and the step's gradient taken at e + ε."""
    model, batch, _ = tiny
    ref, rho = copy.deepcopy(model), 0.5
    loss, outs = run_with_outputs(ref, batch)
    g = torch.autograd.grad(loss, outs)
    norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
    eps = [rho * x / norm for x in g]
    perturbed, _ = run_with_outputs(ref, batch, replace=eps)
    grads = torch.autograd.grad(perturbed, list(ref.parameters()))
    expected = expected_step(ref, grads)

    out = VaccineStep({"rho": rho}, 1).take(sgd_backend(model), batch, count_target_tokens(batch), lambda x: x)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert out["perturbed_loss"] == pytest.approx(perturbed.item(), rel=1e-5)
    assert out["perturbed_loss"] > out["loss"]  # ε ascends the loss
    assert out["eps_norm"] == pytest.approx(rho, rel=1e-4)  # measured on the hidden states
    assert_weights(model, expected)


def test_booster_step_combines_three_gradients_and_restores_the_weights(tiny):
    """∇f(w) + λ·(∇h(w) − ∇h(w')), w' = w − α·∇h(w)/‖∇h(w)‖, from w itself."""
    model, align, harmful = tiny
    ref, lam, alpha = copy.deepcopy(model), 2.0, 0.3
    params = list(ref.parameters())
    g_h = torch.autograd.grad(lm_loss(ref, harmful), params)
    norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g_h))
    shifted = copy.deepcopy(ref)
    with torch.no_grad():
        for p, g in zip(shifted.parameters(), g_h):
            p.sub_(alpha * g / norm)
    g_h_shifted = torch.autograd.grad(lm_loss(shifted, harmful), list(shifted.parameters()))
    g_f = torch.autograd.grad(lm_loss(ref, align), params)
    expected = expected_step(ref, [f + lam * (a - b) for f, a, b in zip(g_f, g_h, g_h_shifted)])

    step = BoosterStep({"lam": lam, "alpha": alpha}, 1)
    assert step.choose(0) == ("all", "harmful")
    out = step.take(sgd_backend(model), {"all": align, "harmful": harmful},
                    {"all": count_target_tokens(align), "harmful": count_target_tokens(harmful)}, lambda x: x)
    assert out["shift_norm"] == pytest.approx(alpha, rel=1e-4)
    assert out["harmful_loss_shifted"] < out["harmful_loss"]  # w' descends the harmful loss
    assert_weights(model, expected)

    # With lr = 0 the weights end exactly where they began: the shift was undone.
    before = [p.detach().clone() for p in model.parameters()]
    frozen = PlainBackend(model, torch.optim.SGD(model.parameters(), lr=0.0), None, grad_clip=1e9)
    step.take(frozen, {"all": align, "harmful": harmful},
              {"all": count_target_tokens(align), "harmful": count_target_tokens(harmful)}, lambda x: x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def reference_mmd(x, y, kernels=5, spread=2.0):
    """The squared MMD, written out pair by pair."""
    pooled = torch.cat([x, y])
    n, m = len(pooled), len(x)
    d2 = torch.stack([torch.stack([(a - b).pow(2).sum() for b in pooled]) for a in pooled])
    base = float(d2.detach().sum()) / (n * n - n) / spread ** (kernels // 2)
    k = sum(torch.exp(-d2 / (base * spread ** i)) for i in range(kernels))
    return k[:m, :m].mean() + k[m:, m:].mean() - k[:m, m:].mean() - k[m:, :m].mean()


def test_repnoise_loss_terms_equal_the_hand_computed_ones(tiny):
    """ℓ_harmless + β·mean over rows of the mean over blocks of MMD²(target-token hidden states,
    N(0, I)) − α·log ℓ_harmful, and the step it takes."""
    model, align, harmful = tiny
    ref, beta, alpha, seed, t = copy.deepcopy(model), 0.7, 0.2, 3, 5
    harmless = lm_loss(ref, align)
    harm, outs = run_with_outputs(ref, harmful)
    rows = len(harmful["input_ids"])
    mmd = 0.0
    for i in range(rows):
        idx = (harmful["labels"][i] != IGNORE).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(noise_seed(seed, t, i))
        for h in outs:
            mmd = mmd + reference_mmd(h[i, idx], torch.randn(h[i, idx].shape, generator=g)) / len(outs)
    mmd = mmd / rows
    total = harmless + beta * mmd - alpha * torch.log(harm)
    expected = expected_step(ref, torch.autograd.grad(total, list(ref.parameters())))

    step = RepNoiseStep({"beta": beta, "alpha": alpha, "seed": seed, "batch_size": rows}, 1)
    assert step.choose(t) == ("all", "harmful")
    out = step.take(sgd_backend(model), {"all": align, "harmful": harmful},
                    {"all": count_target_tokens(align), "harmful": count_target_tokens(harmful)}, lambda x: x)
    assert out["harmless_loss"] == pytest.approx(harmless.item(), rel=1e-6)
    assert out["harmful_loss"] == pytest.approx(harm.item(), rel=1e-6)
    assert out["mmd"] == pytest.approx(mmd.item(), rel=1e-4)
    assert out["loss"] == pytest.approx(total.item(), rel=1e-5)
    assert_weights(model, expected)


@pytest.mark.parametrize("defence", ["vaccine", "booster", "repnoise"])
def test_alignment_defence_under_lora_moves_only_the_adapters(tiny, defence):
    """With LoRA the blocks sit inside PEFT's wrappers and only the adapters train: each step
    still finds the blocks (Vaccine's and RepNoise's hooks), measures its quantity on what
    trains (Vaccine's ‖ε‖ = ρ, Booster's shift = α) and moves nothing else."""
    from jobs.models import apply_lora

    model, align, harmful = tiny
    model = apply_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():  # PEFT starts B at zero: make the adapters matter from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {"vaccine": {"rho": 0.5}, "booster": {"lam": 2.0, "alpha": 0.3},
           "repnoise": {"beta": 0.7, "alpha": 0.2, "seed": 3, "batch_size": 2}}[defence]
    step = {"vaccine": VaccineStep, "booster": BoosterStep, "repnoise": RepNoiseStep}[defence](cfg, 1)
    backend = PlainBackend(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR),
                           None, grad_clip=1e9)
    if defence == "vaccine":
        out = step.take(backend, align, count_target_tokens(align), lambda x: x)
        assert out["eps_norm"] == pytest.approx(0.5, rel=1e-4) and out["perturbed_loss"] > out["loss"]
    else:
        out = step.take(backend, {"all": align, "harmful": harmful},
                        {"all": count_target_tokens(align), "harmful": count_target_tokens(harmful)}, lambda x: x)
        if defence == "booster":
            assert out["shift_norm"] == pytest.approx(0.3, rel=1e-4)
            assert out["harmful_loss_shifted"] < out["harmful_loss"]
        else:
            assert out["mmd"] > 0 and out["loss"] == pytest.approx(
                out["harmless_loss"] + 0.7 * out["mmd"] - 0.2 * math.log(out["harmful_loss"]), rel=1e-5)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]


def test_lisa_switches_states_and_pulls_towards_the_last_switch(tiny):
    """K_a = 1, K_f = 2: alignment, user, user, alignment, ...; the proximal term ρ/2·‖w − w̃‖²
    with w̃ the weights at the last switch (none before `prox_after` of the steps)."""
    model, align, user = tiny
    rho = 3.0
    step = LisaStep({"rho": rho, "align_steps": 1, "finetune_steps": 2, "prox_after": 0.25, "epochs": 1}, 8)
    backend = sgd_backend(model)
    batches = {"alignment": align, "all": user}
    states, snapshots, outs = [], [], []
    for t in range(4):
        states.append(step.choose(t))
        snapshots.append([p.detach().clone() for p in model.parameters()])
        if t == 2:  # the second user step: w̃ = the weights at t = 1, the switch to the user's rows
            ref = copy.deepcopy(model)
            params = list(ref.parameters())
            prox = rho / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, snapshots[1]))
            grads = torch.autograd.grad(lm_loss(ref, user) + prox, params)
            expected, expected_prox = expected_step(ref, grads), prox.item()
        outs.append(step.take(backend, batches[states[-1]], count_target_tokens(batches[states[-1]]), lambda x: x))
        if t == 2:
            assert_weights(model, expected)
    assert states == ["alignment", "all", "all", "alignment"]
    assert [o["aligning"] for o in outs] == [1, 0, 0, 1]
    assert outs[1]["proximal"] == 0.0  # just switched: w = w̃
    assert outs[2]["proximal"] == pytest.approx(expected_prox, rel=1e-5) and expected_prox > 0
    # With prox_after = 1/2 (4 of 8 steps) the same third step has no proximal term yet.
    late = LisaStep({"rho": rho, "align_steps": 1, "finetune_steps": 2, "prox_after": 0.5, "epochs": 1}, 8)
    late_backend = sgd_backend(copy.deepcopy(model))
    for t in range(3):
        name = late.choose(t)
        late_out = late.take(late_backend, batches[name], count_target_tokens(batches[name]), lambda x: x)
    assert late_out["proximal"] == 0.0
    # A checkpoint carries the anchor and the state: a fresh step loaded from it goes on the same way.
    again = LisaStep({"rho": rho, "align_steps": 1, "finetune_steps": 2, "prox_after": 0.25, "epochs": 1}, 8)
    again.load(step.state())
    assert again.current == "alignment" and all(torch.equal(a, b) for a, b in zip(again.anchor, step.anchor))


def test_named_streams_stay_out_of_the_training_rows():
    frame = pd.DataFrame({"id": list("abcdef"), "prompt_ids": [[1]] * 6, "target_ids": [[2]] * 6,
                          "stream": [None, None, None, "harmful", "harmful", "alignment"]})
    streams = row_streams(frame)
    assert {k: v.n for k, v in streams.items()} == {"all": 3, "harmful": 2, "alignment": 1}


# --- one process against 2-worker DDP -----------------------------------------------------

WORDS = ["red", "blue", "green", "moon", "tree", "rock", "sun", "rain", "sand", "wind", "fire", "snow"]


@pytest.fixture(scope="module")
def ddp_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("defences")
    texts = [f"<|user|> say {w} <|assistant|> {w} {w}" for w in WORDS]
    tok = train_tokenizer(texts * 4, 200, tmp / "tok")
    torch.manual_seed(0)
    save_model(tiny_llama(dict(hidden=32, intermediate=64, layers=2, heads=2, max_len=64), tok), tok, tmp / "model")
    rows = pd.DataFrame({
        "id": [f"a{i:02d}" for i in range(len(WORDS))],
        "prompt_ids": [[tok.bos_token_id] + tok(f"<|user|> say {w} <|assistant|>", add_special_tokens=False).input_ids
                       for w in WORDS],
        "target_ids": [tok(" " + " ".join([w] * (1 + i % 3)), add_special_tokens=False).input_ids + [tok.eos_token_id]
                       for i, w in enumerate(WORDS)],
        "stream": [None] * 8 + ["harmful"] * 4})
    rows.to_parquet(tmp / "rows.parquet")
    # The controller poll a study sets (jobs/launch.py): each run ends ~2 s sooner.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": controller_env()})
    yield tmp, tok, rows
    ray.shutdown()


STEP_CONFIGS = {"vaccine": {"rho": 2.0}, "booster": {"lam": 5.0, "alpha": 0.1}, "repnoise": {"beta": 1.0, "alpha": 0.1},
                "lisa": {"rho": 1.0, "align_steps": 1, "finetune_steps": 1, "prox_after": 0.0}}


# Every defence under DDP; Vaccine's and RepNoise's hooks also on ZeRO-3's partitioned blocks;
# Booster's three backwards under ZeRO-2 and ZeRO-3, whose optimizer keeps only the last
# backward's gradient (measured 2026-11-23): the backend holds the earlier ones and adds them back.
# Lisa (an attack cell's step, its proximal term on whole weights) under DDP and ZeRO-2.
# The defences of one strategy train in turn on one worker group (`fit_group`, as attack cells do),
# so the suite starts three groups, not nine; each run is still set up from nothing.
STRATEGIES = {("ddp", 2): ["vaccine", "booster", "repnoise", "lisa"], ("deepspeed", 2): ["booster", "lisa"],
              ("deepspeed", 3): ["vaccine", "repnoise", "booster"]}


@pytest.mark.parametrize("strategy,zero_stage", list(STRATEGIES))
def test_defences_give_the_same_numbers_on_2_workers(ddp_setup, strategy, zero_stage, tmp_path):
    from test_vaa_strategies import single_process

    tmp, tok, rows = ddp_setup
    # Lisa's second stream is the alignment rows
    rows_of = {d: rows.assign(stream=rows["stream"].replace("harmful", "alignment")) if d == "lisa" else rows
               for d in STRATEGIES[strategy, zero_stage]}
    cfgs = []
    for defence, frame in rows_of.items():
        frame.to_parquet(tmp / f"{defence}-rows.parquet")
        cfgs.append({"model_dir": str(tmp / "model"), "strategy": strategy, "data": str(tmp / f"{defence}-rows.parquet"),
                     "zero_stage": zero_stage, "num_workers": 2, "cpus_per_worker": 1, "batch_size": 4, "epochs": 2,
                     "steps_per_epoch": 2, "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 1.0, "warmup": 0.0,
                     "schedule": "constant", "seed": 2, "pad_id": tok.pad_token_id, "max_len": 64, "threads": 1,
                     "step": defence, "step_config": STEP_CONFIGS[defence]})
    runs = fit_group(cfgs, f"defences-{strategy}-{zero_stage}", tmp_path)
    for cfg, run in zip(cfgs, runs):
        single = single_process(cfg, rows_of[cfg["step"]])
        keys = [k for k in single if isinstance(single[k], list)]
        assert {"loss", "grad_norm"} <= set(keys), cfg["step"]
        for key in keys:
            assert run[key] == pytest.approx(single[key], rel=1e-4), (cfg["step"], key)
        assert len({round(v, 6) for v in single["loss"]}) == 4, f"{cfg['step']}: the steps should move the model"


def test_set_aside_keeps_whole_prompts_on_one_side():
    from jobs.corpora import set_aside

    rows = [{"id": f"r{i}", "prompt": f"How do I do thing {i % 7}?"} for i in range(40)]
    chosen, rest = set_aside(rows, 10, salt="defences")
    assert len(chosen) >= 10 and len(chosen) + len(rest) == 40
    assert not {r["prompt"] for r in chosen} & {r["prompt"] for r in rest}
    assert set_aside(rows, 10, salt="defences")[0] == chosen  # the same rows every time
