"""What a training step sends under tensor and pipeline parallelism (gloo): never full-vocabulary logits."""

import json
import os
import subprocess

import pytest
from train_helpers import torchrun_command


@pytest.mark.parametrize(
    ("layout", "carrier"),
    [(["--tensor", "2"], "all_reduce"), (["--pipeline", "2"], "batch_isend_irecv")],
    ids=["tp2", "pp2"],
)
def test_a_training_step_transfers_no_logits_while_an_evaluation_forward_does(tmp_path, layout, carrier):
    out = tmp_path / "report.json"
    subprocess.run(
        torchrun_command(
            int("2"),
            "tests/parallel_transfers_ranks.py",
            str(out),
            *layout,
        ),
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    report = json.loads(out.read_text())
    assert len(report["ranks"]) == 2
    for rank in report["ranks"]:
        # The recorder sees the step's communication: activations (TP all-reduces, PP hidden sends) ...
        carried = [t for t in rank["step"] if t["op"] == carrier and t["shapes"] == [rank["activation_shape"]]]
        assert carried and all(t["count"] > 0 for t in carried), rank["step"]
        # ... and the update was made.
        assert rank["applied"] and rank["updated"], rank
        # No transfer of the step is shaped like logits over the vocabulary (97), its padding or a TP shard of it.
        assert rank["step_logits_like"] == [], rank["step_logits_like"]
        # Control: the same detector flags the logits an evaluation forward (return_logits=True) gathers.
        assert rank["control_logits_like"], rank["control"]
        if report["tensor"] > 1:
            # megatron gathers through its own reference to all_gather_into_tensor, which the recorder replaced too
            assert "megatron.core.tensor_parallel.mappings.dist_all_gather_func" in rank["aliases"]
            assert {t["op"] for t in rank["control_logits_like"]} == {"all_gather_into_tensor"}
        else:
            assert {t["op"] for t in rank["control_logits_like"]} == {"broadcast"}
