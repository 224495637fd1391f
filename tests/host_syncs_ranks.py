"""Runs `sleepscale train CONFIG [overrides]` in this process and counts the operators that read a
device value on the host during training steps that do not log (see test_sleep_plan.HostSyncs).

    python tests/host_syncs_ranks.py OUT.json CONFIG key=value ...

The count runs from the end of step 2 to the end of step 3 (a full step cycle: the tail of step 2,
then step 3's data, forward-backward, update decision and optimizer step); with log_every and
checkpoint.every past step 3 that cycle neither logs nor saves. Each sync is named by the innermost
frame outside torch that asked for it."""

import json
import sys
import traceback
from pathlib import Path

from test_sleep_plan import HostSyncs

from sleepscale.cli import main
from sleepscale.train import faults

# Frames that only carry an operator call (dispatch, tensor methods), skipped when naming who asked.
OPERATOR_PLUMBING = (
    "torch/utils/_python_dispatch.py",
    "torch/_tensor.py",
    "torch/overrides.py",
    "torch/_dynamo/",
    "torch/optim/optimizer.py",
    "torch/_compile.py",
    "host_syncs_ranks.py",
    "test_sleep_plan.py",
)


class NamedSyncs(HostSyncs):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = len(self.seen)
        result = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.seen) > before:
            frames = [
                f for f in traceback.extract_stack()[:-1] if not any(part in f.filename for part in OPERATOR_PLUMBING)
            ]
            self.where.append(f"{func._schema.name} in {Path(frames[-1].filename).name}:{frames[-1].name}")
        return result


def counting_hooks(model, progress, stop):
    syncs = NamedSyncs()
    syncs.where = []

    def hook(step):
        if step == 2:
            syncs.__enter__()
        elif step == 3:
            syncs.__exit__(None, None, None)
            Path(sys.argv[1]).write_text(json.dumps(syncs.where))

    return [hook]


if __name__ == "__main__":
    faults.install = counting_hooks
    sys.exit(main(["train", *sys.argv[2:]]))
