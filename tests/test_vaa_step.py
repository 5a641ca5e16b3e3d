import math

import pytest
import torch

from jobs.models import tiny_llama, train_tokenizer
from jobs.train import collate
from jobs.vaa import (INVULNERABLE, VULNERABLE, GroupSampler, PlainBackend, count_target_tokens, grad_norm, lambda_at,
                      update_q, vaa_step)


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


def test_lambda_ramp():
    assert [lambda_at(e, 5, 1.0) for e in range(5)] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert lambda_at(2, 4, 0.5) == 0.25


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
    assert out["eps_norm"] == pytest.approx(0.4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


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
    assert out["eps_norm"] == pytest.approx(0.4)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k for k in moved)
