"""One SGD step through medfold.training.distributed's wrapping, started by a launcher (or alone).

Rank r of N takes images [r*B, (r+1)*B) of a fixed batch of N*B; alone it takes all N*B. Rank 0
saves the updated parameters, and OUT.pt.json the world size and how many machines the ranks ran
on. With gradients averaged across ranks, both give the same update.
Usage: one_step.py BACKEND PER_RANK_BATCH TOTAL_BATCH OUT.pt
"""

import json
import sys

import torch

from medfold.training import distributed
from medfold.training.models import build_model

backend, per_rank, total, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = distributed.init(backend, torch.device("cpu"))
gen = torch.Generator().manual_seed(0)
x = torch.randn(total, 1, 32, 32, generator=gen)
y = torch.randint(0, 3, (total,), generator=gen)
model = build_model("lenet", 1, 3, init_seed=0)  # no batch-norm, no dropout: the batch split is all that differs
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
step_model, optimizer = ctx.wrap(model, optimizer, torch.device("cpu"))
rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
loss = torch.nn.functional.cross_entropy(step_model(x[rows]), y[rows])
optimizer.zero_grad()
loss.backward()
optimizer.step()
nodes = ctx.nodes()
if ctx.main:
    torch.save(model.state_dict(), out)
    with open(f"{out}.json", "w") as fh:
        json.dump({"world": ctx.world, "nodes": nodes}, fh)
ctx.shutdown()
