"""The Hutchinson estimator against torch.autograd.functional.hessian."""

import torch

from adahessian import AdaHessian


def _estimate_diag(params, loss_fn, n_samples, backend):
    # lr=0 leaves the parameters where they are; update_each=2 makes the state keep D.
    opt = AdaHessian(params, lr=0.0, update_each=2, n_samples=n_samples, backend=backend)
    opt.zero_grad()
    loss_fn().backward(create_graph=True)
    opt.step()
    return [opt.state[p]["hessian"] for p in params]


def test_dense_quadratic_mean_approaches_diag(backend):
    n, samples = 12, 4000
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    (d,) = _estimate_diag([w], lambda: 0.5 * w @ A @ w, samples, backend)
    H = torch.autograd.functional.hessian(lambda x: 0.5 * x @ A @ x, w.detach())
    assert torch.allclose(H, A)
    # Var(z_i (Hz)_i) = sum_{j != i} H_ij^2: allow five standard errors per entry.
    stderr = ((H**2).sum(1) - H.diag() ** 2).sqrt() / samples**0.5
    assert ((d - H.diag()).abs() <= 5 * stderr).all(), (d - H.diag()).abs() / stderr
    # And it is a real estimate, not the exact diagonal copied from somewhere.
    assert not torch.allclose(d, H.diag(), atol=1e-6)


def test_small_network_mean_approaches_diag(backend):
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    params = list(net.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        chunks, at = [], 0
        for s in shapes:
            k = s.numel()
            chunks.append(flat[at : at + k].view(s))
            at += k
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return ((h @ chunks[2].T + chunks[3] - y) ** 2).mean()

    samples = 3000
    d = torch.cat([t.reshape(-1) for t in _estimate_diag(params, lambda: ((net(x) - y) ** 2).mean(), samples, backend)])
    H = torch.autograd.functional.hessian(loss_of, flat0)
    stderr = ((H**2).sum(1) - H.diag() ** 2).clamp_min(1e-12).sqrt() / samples**0.5
    assert ((d - H.diag()).abs() <= 5 * stderr + 1e-12).all()
