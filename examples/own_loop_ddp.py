"""dynarch in your own DistributedDataParallel loop (torchrun, gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node=2 examples/own_loop_ddp.py runs/mine_ddp

Rank 0 decides each step's mutations and the session sends them to every rank; gradient
statistics for GradMax-family inits are summed over all ranks' batches, a prune's channels are
chosen on rank 0. DDP holds the old parameters after a mutation, so the session wraps the model
anew (``wrap=DDP``): train through ``session.net``. Rank 0 writes the run dir.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dynarch
from dynarch.models import vgg_small

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same model on every rank (DDP checks)
model = vgg_small(num_classes=10, in_channels=1, image_size=8, width=8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
data = torch.Generator().manual_seed(1)
steps = 8
batches = [(torch.randn(32, 1, 8, 8, generator=data), torch.randint(0, 10, (32,), generator=data))
           for _ in range(steps)]  # fmt: skip
policy = {
    "_target_": "dynarch.policies.Schedule",
    "mutations": [
        {"step": 3, "op": "grow", "target": "features.conv2", "k": 4, "init": "gradmax"},
        {"step": 5, "op": "prune", "target": "features.conv3", "k": 2, "importance": "taylor"},
    ],
}
run_dir = sys.argv[1] if len(sys.argv) > 1 else None
session = dynarch.Session(model, optimizer, policy=policy, total_steps=steps, run_dir=run_dir,
                          wrap=DDP)  # fmt: skip
for x, y in batches:
    x, y = x[rank::world], y[rank::world]  # this rank's share of the global batch
    session.mutate(x, y)
    loss = F.cross_entropy(session.net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    session.log(loss=loss)
session.close()
digest = sum(float(p.detach().double().sum()) for p in model.parameters())
print(f"rank {rank}: {len(session.events)} mutations, {session.params} parameters, {digest:.12e}")
dist.destroy_process_group()
