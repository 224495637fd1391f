"""The statically scheduled pipeline (`sleepscale.parallel.pipeline`) on gloo ranks against the
single-process engine (float64): loss, logits and gradients; transfers pairing up rank by rank; no
thread but the main one during a step; saved-for-backward bytes bounded as M grows."""

import json
import os
import subprocess

import pytest
from train_helpers import torchrun_command

CASES = {"hard", "sliding", "n1", "checkpointed-truncated", "prelude-coda", "sleep-on-context"}


@pytest.mark.slow
# the two four-rank layouts in one launch (one start-up)
@pytest.mark.parametrize(("ranks", "tensors"), [(2, [1]), (4, [2, 1])], ids=["pp2", "tp2xpp2-then-pp4"])
def test_statically_scheduled_pipeline_equals_the_single_process(tmp_path, ranks, tensors):
    out = tmp_path / "report.json"
    subprocess.run(
        torchrun_command(
            ranks,
            "tests/pipeline_ranks.py",
            str(out),
            "--tensor",
            ",".join(map(str, tensors)),
        ),
        check=True,
        capture_output=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    reports = json.loads(out.read_text())
    assert sorted(reports) == sorted(map(str, tensors))
    for tensor in tensors:
        report = reports[str(tensor)]
        saved = report.pop("saved_bytes")
        forms = report.pop("forms")
        assert set(report) == CASES | ({"compiled"} if tensor == 1 else set())
        assert tensor > 1 or report["compiled"].pop("graphs") > 0  # the stage's blocks did run compiled
        # float64 throughout, but the vocab-parallel cross-entropy of tensor parallelism computes in float32
        tolerance = 1e-12 if tensor == 1 else 1e-6
        for case, result in report.items():
            assert result["stages_cover_the_model"] and result["transfers_pair_up"], (tensor, case, result)
            assert result["threads"] == 1, (tensor, case, result)
            assert max(result["logits"], result["loss"], result["grads"]) < tolerance, (tensor, case, result)
        assert saved["many"] <= 2 * saved["few"], (tensor, saved)  # M = 8 against M = P micro-batches
        # every recomputation form equals checkpoint none bit for bit
        assert forms == {"block": True, "nested": True, "selective": True}, (tensor, forms)
