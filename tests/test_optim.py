"""gradzip.optim.Adam: plain Adam/AdamW until frozen, then the second moment stays put."""

import pytest
import torch

import gradzip.optim as go


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, opt, steps=25, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=g)
        y = torch.randint(3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_unfrozen_is_torch_adam(decoupled, wd):
    ref_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    a, b = _model(), _model()
    ref = ref_cls(a.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd)
    mine = go.Adam(b.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd,
                   decoupled=decoupled)  # fmt: skip
    torch.testing.assert_close(_train(b, mine), _train(a, ref), rtol=1e-5, atol=1e-6)


def test_frozen_variance_stops_updating_and_the_step_uses_it():
    m = _model()
    opt = go.AdamW(m.parameters(), lr=1e-2, freeze_after=3)
    _train(m, opt, steps=3)
    v3 = [opt.state[p]["exp_avg_sq"].clone() for p in m.parameters()]
    m3 = [opt.state[p]["exp_avg"].clone() for p in m.parameters()]
    _train(m, opt, steps=4, seed=7)
    for p, v, mo in zip(m.parameters(), v3, m3, strict=True):
        assert torch.equal(opt.state[p]["exp_avg_sq"], v)  # frozen
        assert not torch.equal(opt.state[p]["exp_avg"], mo)  # the first moment moves on
    # one more step by hand: p <- p (1 - lr wd) - lr m_hat / (sqrt(v / (1 - b2^3)) + eps)
    p = next(iter(m.parameters()))
    p.grad = torch.ones_like(p)
    before, st = p.detach().clone(), opt.state[p]
    mom = 0.9 * st["exp_avg"] + 0.1 * p.grad
    t = int(st["step"]) + 1
    want = before * (1 - 1e-2 * 1e-2) - 1e-2 / (1 - 0.9**t) * mom / (
        (st["exp_avg_sq"] / (1 - 0.999**3)).sqrt() + 1e-8
    )
    for q in m.parameters():
        if q is not p:
            q.grad = None
    opt.step()
    torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_clear_errors():
    ps = _model().parameters()
    for kw, msg in [({"freeze_after": 0}, "freeze_after"), ({"betas": (1.0, 0.9)}, "betas"),
                    ({"lr": -1}, "lr")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            go.Adam(ps, **kw)


def test_preconditioner_is_the_floored_root_of_the_corrected_variance():
    m = _model()
    opt = go.Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.99), floor=0.5, freeze_after=4)
    p = next(iter(m.parameters()))
    assert opt.preconditioner(p) is None  # nothing measured yet
    _train(m, opt, steps=6)
    v = opt.state[p]["exp_avg_sq"]
    want = (v / (1 - 0.99**4)).sqrt()  # frozen after step 4: its bias correction too
    want = want.clamp(min=0.5 * float(want.mean()))
    torch.testing.assert_close(opt.preconditioner(p), want)
    assert bool((opt.preconditioner(p) >= 0.5 * float(want.mean()) - 1e-12).all())
