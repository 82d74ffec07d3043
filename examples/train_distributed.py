"""Data-parallel AdaHessian with torchrun: each rank trains on its shard of scikit-learn's
digits; AdaHessian averages gradients and Hessian estimates across ranks itself.

    torchrun --nproc-per-node 2 examples/train_distributed.py

The model is NOT wrapped in DistributedDataParallel (DDP has no double backward).
"""

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

from adahessian import AdaHessian

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32, device=device) / 16
y = torch.tensor(digits.target, device=device)
train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]

torch.manual_seed(0)  # the same initial weights on every rank
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device)
opt = AdaHessian(model.parameters(), lr=0.1, update_each=2, process_group="world")

batch = 60  # per rank; equal shard sizes and a per-rank mean loss keep the average exact
for epoch in range(10):
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch)).to(device)
    for start in range(0, len(order) - batch * world + 1, batch * world):
        idx = order[start + rank * batch : start + (rank + 1) * batch]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
        loss.backward(create_graph=opt.hessian_due)
        opt.step()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    if rank == 0:
        print(f"epoch {epoch}  last loss {loss.item():.3f}  test accuracy {acc:.3f}")
dist.destroy_process_group()
