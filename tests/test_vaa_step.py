import math

import pytest
import torch

from jobs.models import tiny_llama, train_tokenizer
from jobs.backends import PlainBackend, grad_norm
from jobs.train import collate, count_target_tokens
from jobs.vaa import INVULNERABLE, VULNERABLE, GroupSampler, lambda_at, update_q, vaa_step


def test_q_update_matches_hand_computed_values():
    # q = 0.5, ℓ = 1, η = 0.1: vulnerable: 0.5e^0.2 / (0.5e^0.2 + 0.5); invulnerable: 0.5 / (0.5 + 0.5e^0.2)
    e = math.exp(0.2)
    assert update_q(0.5, VULNERABLE, 1.0, 0.1) == pytest.approx(0.5 * e / (0.5 * e + 0.5))
    assert update_q(0.5, INVULNERABLE, 1.0, 0.1) == pytest.approx(0.5 / (0.5 + 0.5 * e))
    # q = 0.2 (importance weight 1/q = 5): 0.2e^{0.5} / (0.2e^{0.5} + 0.8)
    assert update_q(0.2, VULNERABLE, 1.0, 0.1) == pytest.approx(0.2 * math.exp(0.5) / (0.2 * math.exp(0.5) + 0.8))


def test_q_is_clipped():
    assert update_q(0.85, VULNERABLE, 10.0, 1.0) == 0.9
    assert update_q(0.15, INVULNERABLE, 10.0, 1.0) == 0.1
    assert update_q(0.5, VULNERABLE, 10.0, 1.0, clip=(0.2, 0.7)) == 0.7


def test_lambda_ramp_follows_the_fractional_epoch():
    # E = 2 epochs of 4 steps: λ_t = λ · (t / 4) / 2, a step at a time (not an epoch at a time).
    assert [lambda_at(t, 4, 2, 1.0) for t in range(8)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
    assert lambda_at(6, 4, 2, 0.5) == pytest.approx(0.375)
    # Over a run about half of all steps perturb (the integer-epoch ramp gave a third at E = 3).
    steps = [lambda_at(t, 100, 3, 1.0) for t in range(300)]
    assert sum(steps) / len(steps) == pytest.approx(0.5, abs=0.01)


def test_ablation_sampling():
    assert {GroupSampler(0, mode="vulnerable").group() for _ in range(50)} == {VULNERABLE}
    assert {GroupSampler(0, mode="invulnerable").group() for _ in range(50)} == {INVULNERABLE}
    assert {GroupSampler(0, mode="none").group() for _ in range(50)} == {INVULNERABLE}
    imp = GroupSampler(0, q=0.3, mode="importance")
    imp.observe(VULNERABLE, 5.0, 0.1)
    assert imp.q == 0.3  # fixed weights
    draws = [imp.group() for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    dro = GroupSampler(0, q=0.5)
    dro.observe(VULNERABLE, 1.0, 0.1)
    assert dro.q > 0.5
    # Ranks sharing the seed draw the same groups and coins.
    a, b = GroupSampler(7), GroupSampler(7)
    assert [(a.group(), a.perturb(0.5)) for _ in range(20)] == [(b.group(), b.perturb(0.5)) for _ in range(20)]


@pytest.fixture()
def tiny(tmp_path):
    tok = train_tokenizer(["<|user|> say red <|assistant|> red red", "<|user|> say blue <|assistant|> blue"] * 5, 100,
                          tmp_path / "tok")
    torch.manual_seed(0)
    model = tiny_llama(dict(hidden=16, intermediate=32, layers=1, heads=2, max_len=32), tok)
    batch = collate([[1, 5, 6, 7], [1, 5, 8, 7]], [[9, 9, 2], [10, 2]], tok.pad_token_id, 32)
    return model, batch


def test_perturbation_restores_parameters_exactly(tiny):
    model, batch = tiny
    before = [p.detach().clone() for p in model.parameters()]
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that cannot move θ
    out = vaa_step(PlainBackend(model, frozen, None, 1.0), batch, count_target_tokens(batch), rho=0.4, perturb=True)
    assert out["eps_norm"] == pytest.approx(0.4, rel=1e-5)  # measured on the weights, not copied from ρ
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_perturbed_step_equals_the_hand_computed_sam_step(tiny):
    """θ' = θ − lr·∇ℓ(θ + ρ·g/‖g‖), g = ∇ℓ(θ), computed here by hand on a copy of the model."""
    import copy

    model, batch = tiny
    n, rho, lr = count_target_tokens(batch), 0.4, 0.1
    reference = copy.deepcopy(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    g = torch.autograd.grad(reference(**batch, num_items_in_batch=n).loss, params)
    scale = rho / torch.sqrt(sum((x.double() ** 2).sum() for x in g)).item()
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(x, alpha=scale)
    g_eps = torch.autograd.grad(reference(**batch, num_items_in_batch=n).loss, params)
    expected = [p.detach() - scale * x - lr * y for p, x, y in zip(params, g, g_eps)]  # restored θ, then the step

    no_clip = 1e9
    out = vaa_step(PlainBackend(model, torch.optim.SGD(model.parameters(), lr=lr), None, no_clip), batch, n, rho, True)
    got = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, expected))
    assert out["grad_norm"] == pytest.approx(torch.sqrt(sum((y.double() ** 2).sum() for y in g_eps)).item(), rel=1e-5)
    assert out["eps_norm"] == pytest.approx(rho, rel=1e-5)


def test_perturbed_step_uses_the_gradient_at_theta_plus_eps(tiny):
    model, batch = tiny
    start = {k: v.clone() for k, v in model.state_dict().items()}
    n = count_target_tokens(batch)
    plain = vaa_step(PlainBackend(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1.0), batch, n, 0.4, False)
    after_plain = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(start)
    sam = vaa_step(PlainBackend(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1.0), batch, n, 0.4, True)
    assert sam["loss"] > plain["loss"]  # ℓ(θ+ε) sits uphill of ℓ(θ)
    assert any(not torch.allclose(a, b) for a, b in zip(after_plain, model.parameters()))


def test_grad_norm_is_global():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert grad_norm([a.grad, None, b.grad]).item() == 5.0


def test_loss_is_the_token_mean_of_the_batch(tiny):
    model, batch = tiny
    n = count_target_tokens(batch)
    assert n == 5  # labels after the first position that are not ignored
    backend = PlainBackend(model, torch.optim.SGD(model.parameters(), lr=0.0), None, 1.0)
    assert backend.forward(batch, n).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def test_sampler_state_round_trips():
    a = GroupSampler(5, q=0.4)
    [a.group() for _ in range(7)]
    b = GroupSampler(0)
    b.load(a.state())
    assert b.q == 0.4 and [b.group() for _ in range(10)] == [a.group() for _ in range(10)]


def test_lora_vaa_step_moves_only_adapters(tiny):
    from jobs.models import apply_lora
    from jobs.train import make_optimizer

    model, batch = tiny
    model = apply_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backend = PlainBackend(model, make_optimizer(model, {"lr": 0.05}), None, 1.0)
    out = vaa_step(backend, batch, count_target_tokens(batch), rho=0.4, perturb=True)
    assert out["eps_norm"] == pytest.approx(0.4, rel=1e-5)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k for k in moved)
