"""dynarch in your own training loop: torchvision's resnet18 grows and prunes while it trains.

    python examples/own_loop.py runs/mine     # then: dynarch query runs/mine widths

A plain PyTorch loop; the session's three calls are all dynarch adds. Random 32x32 images
stand in for a data set, so the file runs anywhere in seconds.
"""

import sys

import torch
import torch.nn.functional as F
import torchvision

import dynarch

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(12)]

run_dir = sys.argv[1] if len(sys.argv) > 1 else None  # None: the history stays in memory
session = dynarch.Session(
    model, optimizer, policy="grow_then_prune", total_steps=len(batches),
    loss_fn=F.cross_entropy, run_dir=run_dir,
)  # fmt: skip
for x, y in batches:
    for change in session.mutate(x, y):  # before the update: grow / prune / deepen in place
        print(f"{change.kind} {change.target}: {change.width_before} -> {change.width_after}")
    loss = F.cross_entropy(session.net(x), y)  # session.net: the model (or its DDP wrapper)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    session.log(loss=loss)
session.close()
print(f"{len(session.events)} mutations, {session.params} parameters")
