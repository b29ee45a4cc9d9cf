"""SkipLayer's router on its own: gates, straight-through gradients, the density loss, files, bad config."""

import pytest
import torch

from hsd_exp.errors import ConfigError
from hsd_exp.skip.router import SkipRouter, check_router_config, density_loss, run_rate


def test_a_new_router_is_dense_and_always_run_layers_have_no_gate():
    router = SkipRouter(num_layers=6, hidden_size=32, always_run=[1, 2])
    h = torch.randn(3, 5, 32)  # (B, Q, C)
    assert router.routed == [2, 3, 4, 5]
    for i in range(6):
        assert router.decide(i, h).all()  # dense at start: every layer runs
    assert not router.is_routed(0) and router.gate(0, h).eq(1).all()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
def test_the_gradient_reaches_the_gate_through_the_hard_decision(kind, estimator):
    torch.manual_seed(0)
    router = SkipRouter(num_layers=2, hidden_size=16, kind=kind, estimator=estimator).train()
    h = torch.randn(2, 4, 16)
    layer_out = torch.randn(2, 4, 16)
    z = router.gate(1, h)  # (B, Q) in {0, 1}
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    out = h + z.unsqueeze(-1) * (layer_out - h)  # how training mixes run and skip
    out.sum().backward()
    grads = [p.grad for p in router.gates["1"].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_the_density_loss_moves_the_run_rate_toward_the_target():
    torch.manual_seed(0)
    router = SkipRouter(num_layers=4, hidden_size=16, kind="linear", init_bias=1.0)
    opt = torch.optim.SGD(router.parameters(), lr=0.5)
    h = torch.randn(8, 6, 16)
    mask = torch.ones(8, 6, dtype=torch.bool)
    soft_rate = lambda: torch.stack([router.probs(i, h).mean() for i in router.routed]).mean().item()  # noqa: E731
    before = soft_rate()
    for _ in range(50):
        opt.zero_grad()
        loss = density_loss([run_rate(router.gate(i, h), mask) for i in router.routed], density=0.3)
        loss.backward()
        opt.step()
    after = soft_rate()
    assert before > 0.7 and after < before - 0.2  # pulled from dense toward P = 0.3
    assert density_loss([torch.tensor(0.3), torch.tensor(0.5)], 0.3).item() == pytest.approx(0.04)


def test_per_row_decisions_differ():
    torch.manual_seed(0)
    router = SkipRouter(num_layers=2, hidden_size=8, kind="linear")
    with torch.no_grad():
        router.gates["0"].net.weight.copy_(torch.ones(1, 8))
        router.gates["0"].net.bias.zero_()
    h = torch.stack([torch.ones(1, 8), -torch.ones(1, 8)])  # (B=2, Q=1, C)
    assert router.decide(0, h).view(-1).tolist() == [True, False]


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    router = SkipRouter(num_layers=3, hidden_size=16, always_run=[1], threshold=0.6)
    for p in router.parameters():
        torch.nn.init.normal_(p)
    router.save(tmp_path / "router")
    back = SkipRouter.load(tmp_path / "router")
    h = torch.randn(2, 3, 16)
    assert back.config == router.config
    for i in range(3):
        assert torch.equal(back.probs(i, h), router.probs(i, h))
    with pytest.raises(ConfigError, match="holds no router"):
        SkipRouter.load(tmp_path / "nothing")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "deep"}, "router.kind=deep is unknown"),
    ({"estimator": "reinforce"}, "router.estimator=reinforce is unknown"),
    ({"density": 0}, r"router.density=0 is out of range: must be in \(0, 1\]"),
    ({"density": 1.5}, r"router.density=1.5 is out of range"),
    ({"threshold": 1.0}, r"threshold=1.0 is out of range"),
    ({"always_run": [0], "num_layers": 6}, r"router.always_run has 0: layers are 1-indexed in \[1, 6\]"),
])
def test_bad_router_values_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        check_router_config(**kwargs)
