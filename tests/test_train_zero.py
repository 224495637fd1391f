"""Two torchrun ranks under ZeRO 0/1/2/3 equal one process that sees the same global batch."""

import pytest
import torch
from train_helpers import losses, train, write_config

from sleepscale.config_loading import load_config
from sleepscale.data.build import generate_missing
from sleepscale.data.loader import ShardLoader
from sleepscale.model import build_model
from sleepscale.passes import draw_passes
from sleepscale.sleep import sleep_forward
from sleepscale.train.checkpoint import load_model_from_checkpoint
from sleepscale.train.optim import build_optimizer, lr_factor

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    data = tmp / "data"
    config = write_config(
        tmp,
        data,
        tmp / "first",
        train={"steps": STEPS, "grad_clip": 0.5},
        sleep={"window": 8, "passes": 2, "checkpoint": "pass"},
    )
    generate_missing(load_config(config).data)  # the data, once, as the trainer would (not a launch)
    return tmp, data


def reference_losses(config_path, data, world_size=2) -> list[float]:
    """Written out by hand: every data rank's micro-batches in one process, mean loss, clip, AdamW."""
    config = load_config(config_path)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.optimizer, skips_on_overflow=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, STEPS))
    streams = [
        iter(
            ShardLoader(
                str(data),
                batch_size=config.train.micro_batch_size,
                seed=config.train.seed,
                rank=r,
                world_size=world_size,
            )
        )
        for r in range(world_size)
    ]
    recorded = []
    for step in range(STEPS):
        batches = [next(stream) for stream in streams for _ in range(config.train.grad_accumulation)]
        sleep = config.sleep
        if sleep.random_passes is not None:
            sleep = sleep.model_copy(update={"passes": draw_passes(sleep.random_passes, config.train.seed, step)})
        loss = sum(sleep_forward(model, b["input_ids"], sleep, targets=b["targets"]).loss for b in batches) / len(
            batches
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        schedule.step()
        recorded.append(loss.item())
    return recorded


def test_zero3_keeps_the_loop_gathered_over_a_windows_passes():
    """ZeRO-3's reuse distance: twice the loop, coda and head (what lies between two uses of a loop
    parameter, recomputation included: benchmarks/results/zero3_gather.md), capped at DeepSpeed's
    default; `train.zero3_reuse_distance` replaces it."""
    from conftest import make_config

    from sleepscale.model.hybrid import HybridLM
    from sleepscale.parallel.zero import deepspeed_config

    config = make_config(pattern="AGAGAG", model={"loop": [2, 4]})
    config = config.model_copy(update={"train": config.train.model_copy(update={"zero_stage": 3})})
    model = HybridLM(config.model)
    after_prelude = sum(p.numel() for layer in model.layers[2:] for p in layer.parameters())
    head = sum(p.numel() for p in model.norm.parameters()) + model.lm_head.weight.numel()
    assert deepspeed_config(config)["zero_optimization"]["stage3_max_reuse_distance"] == 2 * (after_prelude + head)
    set_to = config.model_copy(update={"train": config.train.model_copy(update={"zero3_reuse_distance": 0})})
    assert deepspeed_config(set_to)["zero_optimization"]["stage3_max_reuse_distance"] == 0
    huge = config.model_copy(
        update={"model": config.model.model_copy(update={"hidden_size": 8192, "intermediate_size": 32768})}
    )
    assert deepspeed_config(huge)["zero_optimization"]["stage3_max_reuse_distance"] == 10**9
    assert (
        "stage3_max_reuse_distance"
        not in deepspeed_config(config.model_copy(update={"train": config.train.model_copy(update={"zero_stage": 2})}))[
            "zero_optimization"
        ]
    )


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_ranks_match_one_process_with_the_same_global_batch(setup, zero_stage):
    tmp, data = setup
    run = tmp / f"zero{zero_stage}"
    config = write_config(
        tmp,
        data,
        run,
        train={"steps": STEPS, "grad_clip": 0.5, "zero_stage": zero_stage},
        sleep={"window": 8, "passes": 2, "checkpoint": "pass"},
    )
    train(config, ranks=2, timeout=600)
    distributed = [losses(run)[step] for step in range(1, STEPS + 1)]
    torch.testing.assert_close(
        torch.tensor(distributed), torch.tensor(reference_losses(config, data)), rtol=1e-5, atol=0
    )


SLEEP = {"window": 8, "passes": 2, "checkpoint": "pass"}


@pytest.mark.parametrize(
    ("name", "sections", "layout"),
    [
        ("tp2-zero1", {"parallel": {"tensor": 2}}, "tensor 2 x pipeline 1 x data 2"),
        # each step's two micro-batches per data rank fill the two stages; N drawn per step (1 to 3), so
        # that every step's pipeline schedule is built from that step's plans; a backward per traversal
        # goes through ZeRO-2's gradient hooks, which reduce-scatter as gradients arrive
        (
            "pp2-zero2-random-n",
            {
                "parallel": {"pipeline": 2},
                "model": {"pattern": "AG|AG"},
                "train": {"grad_accumulation": 2, "zero_stage": 2},
                "sleep": {"random_passes": {"kind": "uniform", "low": 1, "high": 3}},
            },
            "tensor 1 x pipeline 2 x data 2",
        ),
    ],
    ids=["tp2xdp2-zero1", "pp2xdp2-zero2-random-n"],
)
def test_model_parallel_2_x_data_2_matches_one_process_with_the_same_global_batch(setup, name, sections, layout):
    """ZeRO-1 (tensor) and ZeRO-2 (pipeline) over the data group (model parallelism at ZeRO-0 is checked
    by the resume tests below)."""
    tmp, data = setup
    run = tmp / name
    train_section = {
        "steps": STEPS,
        "grad_clip": 0.5,
        "zero_stage": 1,
        **sections.get("train", {}),
    }  # ZeRO-1 unless said
    config = write_config(
        tmp, data, run, **{**sections, "train": train_section, "sleep": {**SLEEP, **sections.get("sleep", {})}}
    )
    result = train(config, ranks=4, timeout=600)
    assert layout in result.stderr
    distributed = [losses(run)[step] for step in range(1, STEPS + 1)]
    torch.testing.assert_close(
        torch.tensor(distributed), torch.tensor(reference_losses(config, data)), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    ("name", "sections", "ranks", "resume", "message"),
    [
        # through the unsharded checkpoint state, AdamW's moments unsharded
        (
            "tp2-then-tp1",
            {"parallel": {"tensor": 2}},
            2,
            ("parallel.tensor=1", 1),
            "resumed a tensor-parallel 2 checkpoint at tensor-parallel size 1",
        ),
        # through DeepSpeed's whole-model files, Muon's momentum sharded into its tensor-parallel shape
        (
            "muon-tp1-then-tp2",
            {"optimizer": {"name": "muon", "muon_lr": 0.02, "muon_ns_dtype": "float32"}},
            1,
            ("parallel.tensor=2", 2),
            "resumed a tensor-parallel 1 checkpoint at tensor-parallel size 2",
        ),
        (
            "pp2-then-pp2",
            {"parallel": {"pipeline": 2}, "model": {"pattern": "A|GAG"}, "train": {"grad_accumulation": 2}},
            2,
            ("parallel.pipeline=2", 2),
            "resuming from",
        ),
    ],
    ids=["tp2-then-tp1", "muon-tp1-then-tp2", "pp2-then-pp2"],
)
def test_a_run_stopped_at_step_4_resumes_with_the_same_losses(setup, name, sections, ranks, resume, message):
    """ZeRO-0: SIGTERM at step 4, then a restart, possibly at another tensor-parallel size (each
    direction once, AdamW's and Muon's state once each); one data rank throughout."""
    tmp, data = setup
    run = tmp / name
    config = write_config(
        tmp,
        data,
        run,
        sleep=SLEEP,
        **{**sections, "train": {"steps": STEPS, "grad_clip": 0.5, **sections.get("train", {})}},
    )
    train(config, ranks=ranks, check=False, env={"SLEEPSCALE_FAULT_SIGTERM_AT_STEP": "4"}, timeout=600)
    assert (run / "checkpoints" / "latest").read_text() == "step-000004"
    override, resumed_ranks = resume
    result = train(config, override, ranks=resumed_ranks, timeout=600)
    assert message in result.stderr
    resumed = [losses(run)[step] for step in range(1, STEPS + 1)]
    torch.testing.assert_close(
        torch.tensor(resumed), torch.tensor(reference_losses(config, data, world_size=1)), rtol=1e-5, atol=0
    )
    model, _ = load_model_from_checkpoint(run)  # strict: every block's weights (from every stage)
    assert len(model.layers) == 4


def test_a_bf16_pipeline_follows_the_single_process_in_bf16(setup):
    """bf16 with P = 2 (hidden states and their gradients travel in bf16, DeepSpeed's bf16 optimizer
    keeps float32 master weights) against one process in bf16 on the same batches: rounding apart,
    the same losses."""
    tmp, data = setup
    sections = {
        "sleep": SLEEP,
        "model": {"pattern": "AG|AG"},
        "train": {"steps": STEPS, "grad_clip": 0.5, "precision": "bf16", "zero_stage": 1, "grad_accumulation": 2},
    }
    single = write_config(tmp, data, tmp / "bf16-single", **sections)
    piped = write_config(tmp, data, tmp / "bf16-pp2", **sections, parallel={"pipeline": 2})
    train(single, timeout=600)
    train(piped, ranks=2, timeout=600)
    expected = [losses(tmp / "bf16-single")[step] for step in range(1, STEPS + 1)]
    got = [losses(tmp / "bf16-pp2")[step] for step in range(1, STEPS + 1)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-2, atol=0)
