"""Run under torchrun: each rank reads one epoch with 2 workers and writes the keys it saw.
Usage: torchrun --nproc_per_node 2 tests/data_ranks.py DATASET OUT_DIR"""

import json
import sys

import torch.distributed as dist

from sleepscale.data.loader import ShardLoader

dist.init_process_group("gloo")
loader = ShardLoader(sys.argv[1], batch_size=8, num_workers=2, seed=3)  # rank and world size from torch.distributed
steps = [batch["keys"] for batch in loader]
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as out:
    json.dump({"rank": loader.rank, "world_size": loader.world_size, "steps": steps}, out)
dist.destroy_process_group()
