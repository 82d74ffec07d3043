"""Fit a small MLP to a noisy sine with AdaHessian, printing the loss as it goes.

    python examples/quickstart.py
"""

import torch

from adahessian import AdaHessian

torch.manual_seed(0)
x = torch.linspace(-3, 3, 256).unsqueeze(1)
y = torch.sin(x) + 0.05 * torch.randn_like(x)
model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
optimizer = AdaHessian(model.parameters(), lr=0.05, update_each=2)

for step in range(301):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward(create_graph=optimizer.hessian_due)  # the double-backward graph only when needed
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")
