"""What the tests share for training runs: the step, and the small checkpointing run
(a conv, a linear layer and a bfloat16 head in two param groups, every option on) that
the state-dict and torch.optim-contract tests resume, copy and reload."""

import torch

from adahessian import AdaHessian


def backward_and_step(loss, opt, scaler=None):
    """One optimizer step on ``loss``: backward with a graph when a Hessian step is due,
    through ``scaler`` (a torch.amp.GradScaler) when one is given."""
    if scaler is None:
        loss.backward(create_graph=opt.hessian_due)
        opt.step()
    else:
        scaler.scale(loss).backward(create_graph=opt.hessian_due)
        scaler.step(opt)
        scaler.update()


def clip_and_step(opt, params, clip=None, scaler=None):
    """The end of a hand-written iteration as the frameworks run it: unscale (under
    ``scaler``), clip the gradients' norm to ``clip`` (when given), step through the
    scaler or not."""
    if scaler is not None:
        scaler.unscale_(opt)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


class CheckpointNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.fc = torch.nn.Linear(3 * 4 * 4, 2)
        self.head = torch.nn.Linear(2, 2).to(torch.bfloat16)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.conv(x)).flatten(1)).to(torch.bfloat16)).float()


def checkpoint_groups(model):
    """Two param groups: the conv with its own lr, the rest with weight decay."""
    return [{"params": [model.conv.weight, model.conv.bias], "lr": 0.05},
            {"params": list(model.fc.parameters()) + list(model.head.parameters()), "weight_decay": 0.01}]


def checkpoint_run(backend, **options):
    """A fresh CheckpointNet and its optimizer (update_each=3, n_samples=2, conv
    averaging, seed 99, unless ``options`` say otherwise)."""
    torch.manual_seed(0)
    model = CheckpointNet()
    options = dict(dict(update_each=3, n_samples=2, average_conv_kernel=True, seed=99), **options)
    return model, AdaHessian(checkpoint_groups(model), backend=backend, **options)


def checkpoint_batches(n, first=0):
    """Batches ``first`` .. ``first + n - 1`` of one fixed stream."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 1, 6, 6, generator=g), torch.randint(0, 2, (5,), generator=g)) for _ in range(first + n)]
    return batches[first:]


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        backward_and_step(torch.nn.functional.cross_entropy(model(x), y), opt)
