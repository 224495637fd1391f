"""`sleepscale train CONFIG`: the training loop, single process or under torchrun.

Read top to bottom: set up processes, data, model; then for each stage build a DeepSpeed engine
over the stage's trainable parameters and run its steps (sleep forward, backward, guarded update,
metrics, checkpoints, evaluation); finally evaluate and report.

Exit codes: 0 done; 2 bad configuration or data; 3 stopped after `train.max_bad_steps`
consecutive skipped steps (NaN/Inf, or a loss or gradient spike: `sleepscale.train.spikes`), with
a checkpoint of the last good state; 75 stopped by SIGTERM or SIGUSR1 after writing a checkpoint
(the next start resumes from it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import yaml
from torch import nn

from sleepscale.config import Config, ConfigError, StageConfig
from sleepscale.data.loader import ShardLoader
from sleepscale.data.shards import read_manifest
from sleepscale.eval import evaluate, evaluations, format_table, plot, plot_history, write_csv
from sleepscale.eval import metrics as eval_metrics
from sleepscale.flops import peak_flops, plan_flops, training_flops_per_token
from sleepscale.model.gdn import GDNState
from sleepscale.model.hybrid import HybridLM
from sleepscale.parallel.rank_model import build_rank_model
from sleepscale.passes import draw_passes
from sleepscale.sleep import plan_for, sleep_forward
from sleepscale.tracking import Tracker
from sleepscale.train import faults
from sleepscale.train.checkpoint import UNSHARDED, Checkpointer, restore_rng_states, rng_states
from sleepscale.train.distributed import Distributed, deepspeed_config, setup_distributed, setup_model_parallel
from sleepscale.train.optim import build_optimizer, lr_factor
from sleepscale.train.spikes import SpikeGuard
from sleepscale.train.step import UpdateGuard, get_forward_backward_func, loss_on_host, micro_batch, precision_context

if TYPE_CHECKING:
    from sleepscale.parallel.pipeline_stage import PipelineStage

log = logging.getLogger("sleepscale.train")

EXIT_DONE, EXIT_BAD_STEPS, EXIT_PREEMPTED = 0, 3, 75


class SleepingModel(nn.Module):
    """What DeepSpeed wraps: the hybrid model run by the sleep engine (ZeRO-3 hooks need an nn.Module)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, sleep, plan=None, return_logits=False):
        """Training asks for the loss only: no logits are gathered or kept (evaluation asks for them)."""
        return sleep_forward(self.model, input_ids, sleep, targets=targets, plan=plan, return_logits=return_logits)


@dataclasses.dataclass
class Stage:
    index: int
    config: StageConfig
    start: int  # first global step of the stage
    end: int  # one past its last


@dataclasses.dataclass
class Progress:
    step: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    loss_spikes: int = 0
    grad_spikes: int = 0
    tokens: int = 0
    flops: float = 0.0  # training FLOPs so far (`sleepscale.flops`, every data rank's)
    seconds: float = 0.0  # wall seconds spent in training steps so far (not start-up, evaluation or checkpoints)
    mlflow_run_id: str | None = None
    loss_history: list[float] = dataclasses.field(default_factory=list)  # of accepted steps, for SpikeGuard
    grad_norm_history: list[float] = dataclasses.field(default_factory=list)


class StopSignal:
    """SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary, then exit 75."""

    def __init__(self):
        self.received: int | None = None
        for number in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        self.received = number


@dataclasses.dataclass
class Run:
    """What every stage of a run shares."""

    config: Config
    ctx: Distributed
    loader: ShardLoader
    checkpointer: Checkpointer
    tracker: Tracker
    progress: Progress
    stop: StopSignal
    data_path: str
    shapes: nn.Module  # the unsharded hybrid model on the meta device: FLOPs are counted from its shapes
    pipeline: PipelineStage | None  # this rank's stage, with pipeline parallelism
    after_step: list  # callables of the step number; empty unless test fault injection is switched on


def run_training(config: Config) -> int:
    ctx = setup_model_parallel(setup_distributed(), config.parallel.tensor, config.parallel.pipeline)
    torch.manual_seed(config.train.seed)
    if ctx.device.type == "cuda" and config.train.precision == "fp32" and config.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 storage, TF32 matmuls
    run_dir = Path(config.train.run_dir)
    data_path = _ensure_dataset(config, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    dist.barrier()

    loader = ShardLoader(
        data_path, "train", batch_size=config.train.micro_batch_size, num_workers=config.data.num_workers,
        seed=config.train.seed, skip_bad_samples=config.data.skip_bad_samples,
        max_skipped_fraction=config.data.max_skipped_fraction,
        shard_url_prefix=config.data.shard_url_prefix, rank=ctx.data_rank, world_size=ctx.data_size,
    )
    _check_vocabulary(config, loader)
    stages = _plan_stages(config, loader)
    checkpointer = Checkpointer(run_dir, config.checkpoint.keep, ctx)
    resume_from = checkpointer.latest()
    hybrid, pipeline = build_rank_model(config, ctx.groups, ctx.device), None
    if config.model.init_from and resume_from is None:
        log.info("weights from %s", config.model.init_from)
    if config.parallel.pipeline > 1:
        from sleepscale.parallel.pipeline_stage import PipelineStage

        if config.train.grad_accumulation < config.parallel.pipeline:
            log.warning("parallel.pipeline %d with train.grad_accumulation %d: fewer micro-batches than stages leave "
                        "stages idle; set grad_accumulation >= %d", config.parallel.pipeline, config.train.grad_accumulation,
                        config.parallel.pipeline)
        hybrid = pipeline = PipelineStage(hybrid, config.model.stage_ranges, ctx.groups.pipeline.rank())
    model = SleepingModel(hybrid)
    with torch.device("meta"):
        shapes = HybridLM(config.model)
    tracker = Tracker(config, run_dir, enabled=ctx.is_main)
    stop = StopSignal()

    progress = Progress()
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer.json").read_text())
        _check_resumable(saved, config, ctx)
        progress = Progress(**saved["progress"])
        log.info("resuming from %s (step %d)", resume_from, progress.step)
        if ctx.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", progress.step)
    progress.mlflow_run_id = tracker.start(
        progress.mlflow_run_id, {"passes": str(config.sleep.passes), "eviction": config.sleep.eviction, **config.tracking.tags}
    )
    run = Run(config, ctx, loader, checkpointer, tracker, progress, stop, data_path, shapes, pipeline,
              faults.install(model, progress, stop))
    total_steps = stages[-1].end
    log.info("run %s: %d steps in %d stage(s), world size %d (tensor %d x pipeline %d x data %d); MLflow %s", run_dir,
             total_steps, len(stages), ctx.world_size, config.parallel.tensor, config.parallel.pipeline, ctx.data_size,
             tracker.uri if tracker.enabled else "off")

    exit_code = EXIT_DONE
    for stage in stages:
        if progress.step >= stage.end and stage is not stages[-1]:
            continue
        engine, stage_sleep = _build_engine(model, config, stage, ctx)
        if resume_from is not None:
            _restore(run, engine, resume_from, saved)
            resume_from = None
        exit_code = _run_stage(run, engine, stage, stage_sleep)
        if exit_code != EXIT_DONE:
            break

    if exit_code == EXIT_DONE:
        _final_report(run, engine, stages[-1])
        tracker.finish("FINISHED")
    else:
        tracker.finish("KILLED" if exit_code == EXIT_PREEMPTED else "FAILED")
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


def _run_stage(run: Run, engine, stage: Stage, stage_sleep) -> int:
    with _progress_bar(run.ctx, run.progress.step, stage) as bar:
        return _run_steps(run, engine, stage, stage_sleep, bar)


def _run_steps(run: Run, engine, stage: Stage, stage_sleep, bar) -> int:
    """The steps of one stage. A step reads no device value on the host except where named: the
    update guard's (`sleepscale.train.step`), the flags agreed over ranks before it (stop; any real
    sample), and, on logging steps only, the metrics. Batches that are padding on every rank (the end
    of an epoch whose bad samples were skipped) are passed over: they are never a step."""
    config, ctx, progress = run.config, run.ctx, run.progress
    batches = _endless(run.loader)
    last_log, startup, startup_logged = time.perf_counter(), None, False
    peak = peak_flops(ctx.device)
    tokens_since_log, steps_since_log, padding_epoch = 0, 0, None
    spikes = SpikeGuard(config.train, progress.loss_history, progress.grad_norm_history)
    if progress.step == stage.start:
        spikes.restart()
    guard = UpdateGuard(config.train, engine, ctx, spikes)
    forward_backward = get_forward_backward_func(run.pipeline, ctx.groups.pipeline if run.pipeline is not None else None,
                                                 config.parallel.pipeline_in_flight)
    while progress.step < stage.end:
        step = progress.step
        step_start = time.perf_counter()
        step_sleep = stage_sleep
        if stage_sleep.random_passes is not None:
            step_sleep = stage_sleep.model_copy(update={"passes": draw_passes(stage_sleep.random_passes, config.train.seed, step)})
        loader_before = run.loader.state_dict()
        micro_batches = [micro_batch(next(batches), run.shapes, step_sleep, ctx.device)
                         for _ in range(config.train.grad_accumulation)]
        stop_now, has_samples = _step_flags(run.stop.received is not None, any(batch.tokens for batch in micro_batches),
                                            ctx.device)
        if stop_now:  # the checkpoint resumes with this step's batches
            _save(run, engine, loader_before)
            log.warning("stopped by signal at step %d after writing a checkpoint; exit code %d (restart to resume)",
                        progress.step, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        if not has_samples:
            if padding_epoch != run.loader.epoch:
                log.warning("passing over the batches of padding only that end epoch %d (its bad samples were skipped); "
                            "they are not steps", run.loader.epoch)
                padding_epoch = run.loader.epoch
            continue
        skipped_before = engine.skipped_steps
        with precision_context(config.train.precision, ctx.device):
            result = forward_backward(engine, micro_batches, step_sleep, guard)
        decision = guard.decide()
        engine.step()  # applies the update, or skips it as `decision` arranged
        bad = engine.skipped_steps > skipped_before

        progress.step = step + 1
        step_tokens = sum(batch.tokens for batch in micro_batches)
        progress.tokens += step_tokens * ctx.data_size  # every data rank reads equal batches
        progress.flops += sum(plan_flops(batch.plan, run.shapes, step_sleep.window) for batch in micro_batches) * ctx.data_size
        tokens_since_log += step_tokens
        steps_since_log += 1
        if startup is None:  # this process's first step: how long the start took
            import psutil

            startup = time.time() - psutil.Process().create_time()
        for hook in run.after_step:
            hook(progress.step)
        progress.skipped_steps += int(bad)
        progress.loss_spikes += int(decision.loss_spike)
        progress.grad_spikes += int(decision.grad_spike)
        progress.bad_steps_in_a_row = progress.bad_steps_in_a_row + 1 if bad else 0
        if not bad and (config.train.loss_spike_ratio is not None or config.train.grad_spike_ratio is not None):
            loss = loss_on_host(ctx, result.loss) if config.train.loss_spike_ratio is not None else None
            spikes.accept(loss, decision.grad_norm)

        if progress.step % config.train.log_every == 0 or progress.step == stage.end:
            norms, pass_norms = _state_norms(result.last.states), result.last.pass_state_norms
            if run.pipeline is not None:
                norms, pass_norms = _over_stages(ctx, norms, pass_norms)
            passes = torch.cat([batch.plan.passes_run() for batch in micro_batches]).float().mean().item()
            flops_per_token = training_flops_per_token([batch.plan for batch in micro_batches], run.shapes, step_sleep.window)
            elapsed = time.perf_counter() - last_log
            metrics = {
                "loss": loss_on_host(ctx, result.loss),
                "lr": engine.get_lr()[0],
                "grad_norm": _as_number(engine.get_global_grad_norm() if decision.grad_norm is None else decision.grad_norm),
                "tokens_per_second": tokens_since_log * ctx.data_size / max(elapsed, 1e-9),
                **_budget(progress),
                "step_seconds": elapsed / steps_since_log,
                "passes": step_sleep.passes,
                "model_flops_per_token": flops_per_token,
                "mfu": None if peak is None else flops_per_token * tokens_since_log * ctx.data_size / max(elapsed, 1e-9) / (peak * ctx.world_size),
                "passes_per_window": passes,
                "skipped_steps": progress.skipped_steps,
                "loss_spikes": progress.loss_spikes,
                "grad_spikes": progress.grad_spikes,
                "stage": stage.index,
                **{f"gdn_state_norm_layer{i}": value for i, value in (norms or {}).items()},
                **{f"state_norm_pass{j + 1}": value for j, value in enumerate([] if pass_norms is None else pass_norms.tolist())},
            }
            if not startup_logged:
                metrics["startup_seconds"], startup_logged = startup, True
            run.tracker.log_metrics(metrics, progress.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:,.0f}", refresh=False)
            last_log, tokens_since_log, steps_since_log = time.perf_counter(), 0, 0
        bar.update(1)

        if progress.bad_steps_in_a_row >= config.train.max_bad_steps:
            _save(run, engine)
            log.error("stopping: %d consecutive steps were skipped (NaN/Inf loss or gradient, or a spike); the "
                      "checkpoint of the last good state is in %s", progress.bad_steps_in_a_row, run.checkpointer.root)
            return EXIT_BAD_STEPS
        progress.seconds += time.perf_counter() - step_start  # (on a GPU: what the next step's flags wait for counts there)
        if progress.step % config.checkpoint.every == 0 or progress.step == stage.end:
            _save(run, engine)
        if config.eval.every and progress.step % config.eval.every == 0 and progress.step != stage.end:
            rows = _evaluate(run, engine, stage_sleep)
            run.tracker.log_metrics({**_budget(progress), **eval_metrics(rows)}, progress.step)
    return EXIT_DONE


def _build_engine(model: SleepingModel, config: Config, stage: Stage, ctx: Distributed):
    """A DeepSpeed engine over the parameters this stage trains (every stage starts a fresh optimizer)."""
    import deepspeed

    patterns = stage.config.train
    for name, parameter in model.model.named_parameters():
        parameter.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
    optimizer = build_optimizer(model.model, config.optimizer, skips_on_overflow=config.train.zero_stage == 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, stage.end - stage.start))
    ds_config = deepspeed_config(config)
    mpu = None
    if ctx.groups is not None:
        from sleepscale.parallel.groups import DeepSpeedMpu, mark_stage_parameters_for_deepspeed

        mpu = DeepSpeedMpu(ctx.groups)
        mark_stage_parameters_for_deepspeed(model, ctx.groups)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
    stage_sleep = config.sleep.model_copy(update={
        "eviction": stage.config.eviction or config.sleep.eviction,
        "passes": stage.config.passes or config.sleep.passes,
    })
    # a ZeRO-3 partitioned parameter is empty here; ds_numel is its whole size
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    log.info("stage %d %r: steps %d-%d, N=%d, eviction %s, %s trainable parameters",
             stage.index, stage.config.name, stage.start + 1, stage.end, stage_sleep.passes, stage_sleep.eviction, f"{trainable:,}")
    return engine, stage_sleep


def _save(run: Run, engine, loader_state: dict | None = None) -> None:
    """`loader_state`: where the data resumes (default: after the batches read so far)."""
    config, ctx = run.config, run.ctx
    trainer_state = {
        "progress": dataclasses.asdict(run.progress), "fingerprint": config.fingerprint(), "world_size": ctx.world_size,
        "data_size": ctx.data_size, "tensor": config.parallel.tensor, "pipeline": config.parallel.pipeline,
        "num_workers": config.data.num_workers,
        "config": config.model_dump(mode="json"),
    }
    shared_files = {}
    if ctx.groups is not None:
        from sleepscale.parallel.tensor import unsharded_training_state

        # ZeRO-1/2 keep optimizer state flat and partitioned: only their weights are written unsharded.
        optimizer = engine.optimizer if config.train.zero_stage == 0 else None
        state = unsharded_training_state(engine.module.model, optimizer, ctx.groups.tensor)
        if run.pipeline is not None:
            state = _merged_over_stages(state, ctx.groups.pipeline)
        shared_files[UNSHARDED] = {**state, "lr_scheduler": engine.lr_scheduler.state_dict(),
                                   "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps}
    run.checkpointer.save(engine, run.progress.step, trainer_state, {"loader": loader_state or run.loader.state_dict(), "rng": rng_states()},
                          shared_files)


def _restore(run: Run, engine, path: Path, saved: dict) -> None:
    """Model, optimizer, schedule, data position and RNG from a checkpoint, at the same tensor-parallel
    size through DeepSpeed, at another one through the checkpoint's unsharded state."""
    ctx, saved_tensor = run.ctx, saved.get("tensor", 1)
    if saved_tensor == run.config.parallel.tensor:
        run.checkpointer.load(engine, path)
    else:
        from sleepscale.parallel.tensor import load_unsharded_training_state

        written = path / UNSHARDED  # by model-parallel runs
        state = torch.load(written, map_location="cpu", weights_only=False) if written.exists() else _unsharded_from_deepspeed(run, engine, path)
        load_unsharded_training_state(engine.module.model, engine.optimizer, state, ctx.groups.tensor if ctx.groups else None)
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        engine.global_steps, engine.skipped_steps = state["global_steps"], state["skipped_steps"]
        log.info("resumed a tensor-parallel %d checkpoint at tensor-parallel size %d", saved_tensor, run.config.parallel.tensor)
    # Ranks are laid out tensor-fastest, and the ranks of one data rank saved the same data position.
    source = ctx.rank if saved_tensor == run.config.parallel.tensor else ctx.data_rank * saved_tensor
    rank_state = run.checkpointer.rank_state(path, source)
    run.loader.load_state_dict(rank_state["loader"])
    restore_rng_states(rank_state["rng"])


def _unsharded_from_deepspeed(run: Run, engine, path: Path) -> dict:
    """The unsharded training state of a single-process-model ZeRO-0 checkpoint, whose DeepSpeed file
    holds the whole model and our optimizer's state (keyed by position, which the same
    `build_optimizer` over the unsplit model gives back)."""
    from sleepscale.parallel.tensor import unsharded_training_state

    saved = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    plain = HybridLM(run.config.model)
    plain.load_state_dict({name.removeprefix("model."): tensor for name, tensor in saved["module"].items()})
    trainable = {name for name, parameter in engine.module.model.named_parameters() if parameter.requires_grad}
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(name in trainable)
    optimizer = build_optimizer(plain, run.config.optimizer, skips_on_overflow=True)
    optimizer.load_state_dict(saved["optimizer"])
    return {**unsharded_training_state(plain, optimizer, None), "lr_scheduler": saved["lr_scheduler"],
            "global_steps": saved["global_steps"], "skipped_steps": saved["skipped_steps"]}


def _final_report(run: Run, engine, last_stage: Stage) -> None:
    config, tracker, run_dir = run.config, run.tracker, Path(run.config.train.run_dir)
    stage_sleep = config.sleep.model_copy(update={"passes": last_stage.config.passes or config.sleep.passes,
                                                  "eviction": last_stage.config.eviction or config.sleep.eviction})
    rows = _evaluate(run, engine, stage_sleep)
    tracker.log_metrics({**_budget(run.progress), **eval_metrics(rows)}, run.progress.step)
    if run.ctx.is_main:
        table = format_table(rows)
        write_csv(rows, run_dir / "eval.csv")
        (run_dir / "eval.md").write_text(table + "\n")
        plot(rows, run_dir / "eval.png")
        names = ["config.yaml", "eval.csv", "eval.md", "eval.png"]
        history = [(record["step"], rows) for record, rows in evaluations(run_dir / "metrics.jsonl")]
        if len(history) > 1:  # periodic evaluation (eval.every)
            plot_history(history, run_dir / "eval_steps.png")
            names.append("eval_steps.png")
        for name in names:
            tracker.log_artifact(run_dir / name)
        print(f"\nvalidation accuracy by difficulty and N:\n{table}\n")
        where = f"MLflow run {tracker.run_id} in {tracker.uri}" if tracker.run_id else "MLflow off"
        print(f"run directory {run_dir}; {where}")
        if tracker.run_id and tracker.uri.startswith("sqlite:"):
            print(f"browse it with: mlflow ui --backend-store-uri {tracker.uri}")


def _evaluate(run: Run, engine, stage_sleep) -> list[dict]:
    config = run.config
    loader = ShardLoader(run.data_path, "validation", batch_size=config.eval.batch_size, shuffle=False,
                         seed=config.train.seed, shard_url_prefix=config.data.shard_url_prefix,
                         rank=run.ctx.data_rank, world_size=run.ctx.data_size)
    batches = _Limited(loader, config.eval.max_batches)
    was_training = engine.module.training
    engine.module.eval()
    if run.pipeline is None:
        def forward(ids, targets, sleep):
            return engine(ids, targets, sleep, return_logits=True)
    else:
        def forward(ids, targets, sleep):
            from sleepscale.parallel.pipeline import evaluate_step

            return evaluate_step(run.pipeline, run.ctx.groups.pipeline, plan_for(run.shapes, ids, sleep, targets), ids, targets,
                                 sleep.window)
    rows = evaluate(engine.module.model, batches, stage_sleep, config.eval.passes, forward=forward, group=run.ctx.data_group)
    engine.module.train(was_training)
    return rows


class _Limited:
    """Re-iterable first `limit` batches of a loader (all of them if limit is None)."""

    def __init__(self, loader, limit):
        self.loader, self.limit = loader, limit

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if self.limit is not None and index >= self.limit:
                break
            yield batch


def _budget(progress: Progress) -> dict[str, float]:
    """What the run has spent so far; logged with the training metrics and with every evaluation, so
    that accuracy can be read against tokens, FLOPs or time (`sleepscale.sweep`)."""
    return {"tokens": progress.tokens, "training_flops": progress.flops, "train_seconds": progress.seconds}


def _as_number(value) -> float | None:
    """A metric value for JSON and MLflow: None when unknown or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _endless(loader):
    while True:
        yield from loader


def _plan_stages(config: Config, loader: ShardLoader) -> list[Stage]:
    stages, start = [], 0
    steps_per_epoch = max(1, loader.batches_per_epoch() // config.train.grad_accumulation)
    for index, stage in enumerate(config.stage_list()):
        length = stage.steps if stage.steps is not None else max(1, round(stage.epochs * steps_per_epoch))
        stages.append(Stage(index, stage, start, start + length))
        start += length
    return stages


def _ensure_dataset(config: Config, ctx: Distributed) -> str:
    """The dataset path, generated first (by rank 0) if the config says how and it is missing."""
    if config.data is None:
        raise ConfigError("data: required for training (a dataset path written by `sleepscale data`)")
    if config.data.generate is not None and not (Path(config.data.path) / "manifest.json").exists():
        if ctx.is_main:
            from sleepscale.data.build import generate_missing

            log.info("generating %s data into %s", config.data.generate.task, config.data.path)
            generate_missing(config.data)
        dist.barrier()
    read_manifest(config.data.path)  # one-line DataError if it is not a dataset
    return config.data.path


def _check_vocabulary(config: Config, loader: ShardLoader) -> None:
    needed = loader.manifest["vocab_size"]
    if config.model.vocab_size < needed:
        raise ConfigError(f"model.vocab_size: {config.model.vocab_size} is smaller than the dataset's vocabulary ({needed})")


def _check_resumable(saved: dict, config: Config, ctx: Distributed) -> None:
    if saved["fingerprint"] != config.fingerprint():
        raise ConfigError(
            f"train.run_dir: {config.train.run_dir} holds a checkpoint of a different configuration "
            "(model, sleep, data, optimizer, schedule, stages or batch settings changed); use a new run_dir"
        )
    saved_data_size, saved_tensor = saved.get("data_size", saved["world_size"]), saved.get("tensor", 1)
    if saved.get("pipeline", 1) != config.parallel.pipeline:
        raise ConfigError(f"parallel.pipeline: the checkpoint was written with {saved.get('pipeline', 1)} pipeline stage(s); "
                          f"resume with the same (now {config.parallel.pipeline})")
    if saved_data_size != ctx.data_size or saved["num_workers"] != config.data.num_workers:
        raise ConfigError(
            f"train.run_dir: the checkpoint was written by {saved_data_size} data-parallel rank(s) with {saved['num_workers']} "
            f"data worker(s); resume with the same (now {ctx.data_size} and {config.data.num_workers})"
        )
    if saved_tensor != config.parallel.tensor and config.train.zero_stage != 0:
        raise ConfigError(
            f"parallel.tensor: the checkpoint was written at tensor-parallel size {saved_tensor} with DeepSpeed's own "
            f"optimizer state (ZeRO-{config.train.zero_stage}); resume at that size (train.zero_stage 0 runs resume at any size)"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Metrics logged after the checkpoint we resume from will be logged again: drop them."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _over_stages(ctx: Distributed, norms: dict[int, float], pass_norms: torch.Tensor | None):
    """Per-layer GDN norms from every stage, and the per-pass loop norm averaged over the stages that have loop GDN layers."""
    gathered = [None] * ctx.groups.pipeline.size()
    dist.all_gather_object(gathered, (norms, None if pass_norms is None else pass_norms.tolist()), group=ctx.groups.pipeline)
    merged = {layer: value for stage_norms, _ in gathered for layer, value in stage_norms.items()}
    per_pass = [values for _, values in gathered if values is not None and any(values)]
    return merged, torch.tensor(per_pass).mean(0) if per_pass else None


def _merged_over_stages(state: dict, group: dist.ProcessGroup) -> dict:
    """The whole model's unsharded training state from each stage's part (names are the whole
    model's), gathered through CPU memory: a pickled CUDA tensor would unpickle onto the sender's
    device index."""
    parts = [None] * group.size()
    dist.all_gather_object(parts, _on_cpu(state), group=group)
    merged = {"weights": {name: value for part in parts for name, value in part["weights"].items()}}
    if state["optimizer"] is None:
        return {**merged, "optimizer": None}
    return {**merged, "optimizer": {name: value for part in parts for name, value in part["optimizer"].items()},
            "param_groups": state["param_groups"]}


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _state_norms(states) -> dict[int, float]:
    return {i: s.fast_weights.detach().float().norm().item() for i, s in enumerate(states) if isinstance(s, GDNState)}


# Scalars travel as tensors on the rank's device: NCCL reduces only device tensors.
def _step_flags(stop: bool, has_samples: bool, device: torch.device) -> tuple[bool, bool]:
    """(whether any rank was asked to stop, whether any rank has a real sample), in one all-reduce
    and one host read: the maximum over ranks of 2 * stop + has_samples. When no rank stops it is
    the maximum of has_samples; when one does, has_samples is not needed."""
    tensor = torch.tensor(2 * int(stop) + int(has_samples), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    value = int(tensor.item())
    return value >= 2, value == 1


def _progress_bar(ctx: Distributed, initial: int, stage: Stage):
    from tqdm import tqdm

    # On rank 0 tqdm decides (None: shown on a terminal, not in a log file); other ranks never show one.
    return tqdm(total=stage.end, initial=initial, desc=f"stage {stage.index}", unit="step",
                disable=None if ctx.is_main else True, dynamic_ncols=True)
