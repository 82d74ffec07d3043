"""No double-backward graph outlives step(): a dropped model is freed."""

import gc
import weakref

import torch

from adahessian import AdaHessian


def _train_and_drop(backend, steps=3, zero_grad_at_end=False):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = AdaHessian(model.parameters(), backend=backend)
    x = torch.randn(4, 8)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward(create_graph=True)
        opt.step()
    ref = weakref.ref(model[0].weight)
    grad_graph = model[0].weight.grad.grad_fn
    return ref, grad_graph


def test_dropped_model_and_optimizer_are_freed(backend):
    ref, grad_graph = _train_and_drop(backend)
    assert grad_graph is None  # step() left a plain gradient behind
    gc.collect()
    assert ref() is None


def test_without_the_fix_the_cycle_would_hold_the_model():
    # The premise: a create_graph backward with no step keeps the parameter alive.
    model = torch.nn.Linear(4, 1)
    model(torch.randn(2, 4)).pow(2).sum().backward(create_graph=True)
    ref = weakref.ref(model.weight)
    del model
    gc.collect()
    assert ref() is not None
