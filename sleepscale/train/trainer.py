"""`sleepscale train CONFIG`: the training loop, single process or under torchrun.

Read top to bottom: set up processes, data and the run's parallelism (`sleepscale.parallel.parallelize`:
this rank's part of the model, and everything that depends on the layout); then for each training
stage build a DeepSpeed engine over the stage's trainable parameters and run its steps (forward and
backward, guarded update, metrics, checkpoints, evaluation); finally evaluate and report.

Exit codes: 0 done; 2 bad configuration or data; 3 stopped after `train.max_bad_steps`
consecutive skipped steps (NaN/Inf, or a loss or gradient spike: `sleepscale.train.spikes`), with
a checkpoint of the last good state; 75 stopped by SIGTERM or SIGUSR1 after writing a checkpoint
(the next start resumes from it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import logging
import math
import signal
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from sleepscale.config import Config, ConfigError, SleepConfig, StageConfig
from sleepscale.data.build import generate_missing
from sleepscale.data.loader import ShardLoader
from sleepscale.data.shards import read_manifest
from sleepscale.eval import evaluate, evaluations, format_table, plot, plot_history, write_csv
from sleepscale.eval import metrics as eval_metrics
from sleepscale.flops import peak_flops, plan_flops, training_flops_per_token
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.precision import precision_context
from sleepscale.parallel.distributed import Distributed, setup_processes
from sleepscale.parallel.parallelism import MicroBatch, Parallelism, StepResult, micro_batch, parallelize
from sleepscale.passes import draw_passes
from sleepscale.tracking import Tracker
from sleepscale.train import faults
from sleepscale.train.checkpoint import UNSHARDED, Checkpointer, restore_rng_states, rng_states
from sleepscale.train.muon import MuonLayout
from sleepscale.train.optim import build_optimizer, lr_factor
from sleepscale.train.spikes import SpikeGuard
from sleepscale.train.step import Decision, UpdateGuard

log = logging.getLogger("sleepscale.train")

EXIT_DONE, EXIT_BAD_STEPS, EXIT_PREEMPTED = 0, 3, 75


@dataclasses.dataclass
class TrainingStage:
    """One of the run's training stages (`stages` in the config): its steps and what it trains."""

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
    """What every training stage of a run shares."""

    config: Config
    ctx: Distributed
    parallelism: Parallelism  # this rank's model and everything that depends on the layout
    loader: ShardLoader
    checkpointer: Checkpointer
    tracker: Tracker
    progress: Progress
    stop: StopSignal
    data_path: str
    shapes: HybridLM  # the whole model on the meta device: plans and FLOPs follow its shapes
    after_step: list  # callables of the step number; empty unless test fault injection is switched on


@dataclasses.dataclass
class LogWindow:
    """What the steps since the last logged one did, for the next metrics."""

    peak: float | None  # the device's peak FLOP/s, when known
    started: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0  # this rank's tokens of real samples
    steps: int = 0
    startup: float | None = None  # seconds from process start to the end of its first step
    startup_logged: bool = False

    def add(self, tokens: int) -> None:
        self.tokens, self.steps = self.tokens + tokens, self.steps + 1
        if self.startup is None:
            self.startup = time.time() - psutil.Process().create_time()

    def restart(self) -> None:
        self.started, self.tokens, self.steps = time.perf_counter(), 0, 0


def run_training(config: Config) -> int:
    ctx = setup_processes(config.parallel)
    run, stages, resume_from = _start(config, ctx)
    exit_code = EXIT_DONE
    for stage in stages:
        if run.progress.step >= stage.end and stage is not stages[-1]:
            continue
        engine, stage_sleep = build_stage_engine(run.parallelism, config, stage)
        if resume_from is not None:
            _restore(run, engine, resume_from)
            resume_from = None
        exit_code = _run_stage(run, engine, stage, stage_sleep)
        if exit_code != EXIT_DONE:
            break

    if exit_code == EXIT_DONE:
        _final_report(run, engine, stages[-1])
        run.tracker.finish("FINISHED")
    else:
        run.tracker.finish("KILLED" if exit_code == EXIT_PREEMPTED else "FAILED")
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


def _start(config: Config, ctx: Distributed) -> tuple[Run, list[TrainingStage], Path | None]:
    """The run's data, model, tracking and progress; where it resumes from (None: from the start)."""
    torch.manual_seed(config.train.seed)
    if ctx.device.type == "cuda" and config.train.precision == "fp32" and config.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 storage, TF32 matmuls
    run_dir = Path(config.train.run_dir)
    data_path = _ensure_dataset(config, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    dist.barrier()
    loader = _train_loader(config, ctx, data_path)
    _check_vocabulary(config, loader)
    stages = _plan_stages(config, loader)
    checkpointer = Checkpointer(run_dir, config.checkpoint.keep, ctx)
    resume_from = checkpointer.latest()
    parallelism = parallelize(config, ctx)
    if config.model.init_from and resume_from is None:
        log.info("weights from %s", config.model.init_from)
    with torch.device("meta"):
        shapes = HybridLM(config.model)
    tracker, stop = Tracker(config, run_dir, enabled=ctx.is_main), StopSignal()
    progress = _resumed_progress(config, parallelism, resume_from)
    progress.mlflow_run_id = tracker.start(
        progress.mlflow_run_id,
        {"passes": str(config.sleep.passes), "eviction": config.sleep.eviction, **config.tracking.tags},
    )
    after_step = faults.install(parallelism.model, progress, stop)
    run = Run(config, ctx, parallelism, loader, checkpointer, tracker, progress, stop, data_path, shapes, after_step)
    log.info(
        "run %s: %d steps in %d stage(s), %s; MLflow %s",
        run_dir,
        stages[-1].end,
        len(stages),
        parallelism.describe(),
        tracker.uri if tracker.enabled else "off",
    )
    return run, stages, resume_from


def _train_loader(config: Config, ctx: Distributed, data_path: str) -> ShardLoader:
    """This data rank's share of the training split."""
    return ShardLoader(
        data_path,
        "train",
        batch_size=config.train.micro_batch_size,
        num_workers=config.data.num_workers,
        seed=config.train.seed,
        skip_bad_samples=config.data.skip_bad_samples,
        max_skipped_fraction=config.data.max_skipped_fraction,
        shard_url_prefix=config.data.shard_url_prefix,
        rank=ctx.data_rank,
        world_size=ctx.data_size,
    )


def _resumed_progress(config: Config, parallelism: Parallelism, resume_from: Path | None) -> Progress:
    """The progress a checkpoint saved (a fresh one without): checked against this run first."""
    if resume_from is None:
        return Progress()
    saved = json.loads((resume_from / "trainer.json").read_text())
    if saved["fingerprint"] != config.fingerprint():
        raise ConfigError(
            f"train.run_dir: {config.train.run_dir} holds a checkpoint of a different configuration "
            "(model, sleep, data, optimizer, schedule, stages or batch settings changed); use a new run_dir"
        )
    parallelism.check_resumable(saved, config.data.num_workers)
    progress = Progress(**saved["progress"])
    log.info("resuming from %s (step %d)", resume_from, progress.step)
    if parallelism.ctx.is_main:
        _truncate_metrics(Path(config.train.run_dir) / "metrics.jsonl", progress.step)
    return progress


def _run_stage(run: Run, engine, stage: TrainingStage, stage_sleep: SleepConfig) -> int:
    with _progress_bar(run.ctx, run.progress.step, stage) as bar:
        return _run_steps(run, engine, stage, stage_sleep, bar)


def _run_steps(run: Run, engine, stage: TrainingStage, stage_sleep: SleepConfig, bar) -> int:
    """The steps of one training stage. A step reads no device value on the host except where named:
    the update guard's (`sleepscale.train.step`), the flags agreed over ranks before it (stop; any
    real sample), and, on logging steps only, the metrics. Batches that are padding on every rank
    (the end of an epoch whose bad samples were skipped) are passed over: they are never a step."""
    config, progress = run.config, run.progress
    batches, padding_epoch = _endless(run.loader), None
    spikes = SpikeGuard(config.train, progress.loss_history, progress.grad_norm_history)
    if progress.step == stage.start:
        spikes.restart()
    guard = UpdateGuard(config.train, engine, run.parallelism, spikes)
    since_log = LogWindow(peak_flops(run.ctx.device))
    while progress.step < stage.end:
        step_start = time.perf_counter()
        step_sleep = _sleep_at_step(stage_sleep, config, progress.step)
        loader_before = run.loader.state_dict()
        micro_batches = [
            micro_batch(next(batches), run.shapes, step_sleep, run.ctx.device)
            for _ in range(config.train.grad_accumulation)
        ]
        stop_now, has_samples = _step_flags(
            run.stop.received is not None, any(b.tokens for b in micro_batches), run.ctx.device
        )
        if stop_now:  # the checkpoint resumes with this step's batches
            return _stop_by_signal(run, engine, loader_before)
        if not has_samples:
            padding_epoch = _pass_over_padding(run.loader, padding_epoch)
            continue
        result, decision, bad = _step(run, engine, guard, micro_batches, step_sleep)
        _account(run, micro_batches, step_sleep, since_log, decision, bad, spikes, result)
        if progress.step % config.train.log_every == 0 or progress.step == stage.end:
            _log_step(run, engine, stage, step_sleep, micro_batches, result, decision, since_log, bar)
        bar.update(1)
        if progress.bad_steps_in_a_row >= config.train.max_bad_steps:
            return _stop_for_bad_steps(run, engine)
        progress.seconds += (
            time.perf_counter() - step_start
        )  # (on a GPU: what the next step's flags wait for counts there)
        if progress.step % config.checkpoint.every == 0 or progress.step == stage.end:
            _save(run, engine)
        if config.eval.due(progress.step) and progress.step != stage.end:
            rows = _evaluate(run, engine, stage_sleep)
            run.tracker.log_metrics({**_budget(progress), **eval_metrics(rows)}, progress.step)
    return EXIT_DONE


def _sleep_at_step(stage_sleep: SleepConfig, config: Config, step: int) -> SleepConfig:
    """The sleep settings of a step: the training stage's, with N drawn for the step under random N
    (the same draw on every rank, replayed on resume)."""
    if stage_sleep.random_passes is None:
        return stage_sleep
    return stage_sleep.model_copy(update={"passes": draw_passes(stage_sleep.random_passes, config.train.seed, step)})


def _step(
    run: Run, engine, guard: UpdateGuard, micro_batches: list[MicroBatch], step_sleep: SleepConfig
) -> tuple[StepResult, Decision, bool]:
    """Forward and backward of the step's micro-batches, the decision, and the update: (the result, the
    decision, whether the step was skipped)."""
    skipped_before = engine.skipped_steps
    with precision_context(run.config.train.precision, run.ctx.device):
        result = run.parallelism.forward_backward(engine, micro_batches, step_sleep, guard.before_backward)
    decision = guard.decide()
    engine.step()  # applies the update, or skips it as `decision` arranged
    return result, decision, engine.skipped_steps > skipped_before


def _account(
    run: Run,
    micro_batches: list[MicroBatch],
    step_sleep: SleepConfig,
    since_log: LogWindow,
    decision: Decision,
    bad: bool,
    spikes: SpikeGuard,
    result: StepResult,
) -> None:
    """The step counted: progress, spent tokens and FLOPs, skips and spikes, fault hooks."""
    progress, data_size = run.progress, run.ctx.data_size
    progress.step += 1
    step_tokens = sum(batch.tokens for batch in micro_batches)
    progress.tokens += step_tokens * data_size  # every data rank reads equal batches
    progress.flops += sum(plan_flops(batch.plan, run.shapes, step_sleep.window) for batch in micro_batches) * data_size
    since_log.add(step_tokens)
    for hook in run.after_step:
        hook(progress.step)
    progress.skipped_steps += int(bad)
    progress.loss_spikes += int(decision.loss_spike)
    progress.grad_spikes += int(decision.grad_spike)
    progress.bad_steps_in_a_row = progress.bad_steps_in_a_row + 1 if bad else 0
    train = run.config.train
    if not bad and (train.loss_spike_ratio is not None or train.grad_spike_ratio is not None):
        loss = run.parallelism.loss_on_host(result.loss) if train.loss_spike_ratio is not None else None
        spikes.accept(loss, decision.grad_norm)


def _log_step(
    run: Run,
    engine,
    stage: TrainingStage,
    step_sleep: SleepConfig,
    micro_batches: list[MicroBatch],
    result: StepResult,
    decision: Decision,
    since_log: LogWindow,
    bar,
) -> None:
    """The step's metrics to MLflow and metrics.jsonl (reads the device: logging steps only)."""
    progress, data_size, world_size = run.progress, run.ctx.data_size, run.ctx.world_size
    norms, pass_norms = run.parallelism.state_norms(result.last)
    passes = torch.cat([batch.plan.passes_run() for batch in micro_batches]).float().mean().item()
    flops_per_token = training_flops_per_token([batch.plan for batch in micro_batches], run.shapes, step_sleep.window)
    elapsed = max(time.perf_counter() - since_log.started, 1e-9)
    tokens_per_second = since_log.tokens * data_size / elapsed
    metrics = {
        "loss": run.parallelism.loss_on_host(result.loss),
        "lr": engine.get_lr()[0],
        "grad_norm": _as_number(engine.get_global_grad_norm() if decision.grad_norm is None else decision.grad_norm),
        "tokens_per_second": tokens_per_second,
        **_budget(progress),
        "step_seconds": elapsed / since_log.steps,
        "passes": step_sleep.passes,
        "model_flops_per_token": flops_per_token,
        "mfu": None if since_log.peak is None else flops_per_token * tokens_per_second / (since_log.peak * world_size),
        "passes_per_window": passes,
        "skipped_steps": progress.skipped_steps,
        "loss_spikes": progress.loss_spikes,
        "grad_spikes": progress.grad_spikes,
        "stage": stage.index,
        **{f"gdn_state_norm_layer{i}": value for i, value in norms.items()},
        **{f"state_norm_pass{j + 1}": value for j, value in enumerate(pass_norms or [])},
    }
    if not since_log.startup_logged:
        metrics["startup_seconds"], since_log.startup_logged = since_log.startup, True
    run.tracker.log_metrics(metrics, progress.step)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:,.0f}", refresh=False)
    since_log.restart()


def _stop_by_signal(run: Run, engine, loader_before: dict) -> int:
    _save(run, engine, loader_before)
    log.warning(
        "stopped by signal at step %d after writing a checkpoint; exit code %d (restart to resume)",
        run.progress.step,
        EXIT_PREEMPTED,
    )
    return EXIT_PREEMPTED


def _stop_for_bad_steps(run: Run, engine) -> int:
    _save(run, engine)
    log.error(
        "stopping: %d consecutive steps were skipped (NaN/Inf loss or gradient, or a spike); the "
        "checkpoint of the last good state is in %s",
        run.progress.bad_steps_in_a_row,
        run.checkpointer.root,
    )
    return EXIT_BAD_STEPS


def _pass_over_padding(loader: ShardLoader, padding_epoch: int | None) -> int:
    """Says once per epoch that its batches of padding only are passed over; the epoch said."""
    if padding_epoch != loader.epoch:
        log.warning(
            "passing over the batches of padding only that end epoch %d (its bad samples were skipped); "
            "they are not steps",
            loader.epoch,
        )
    return loader.epoch


def stage_sleep_settings(config: Config, stage: StageConfig) -> SleepConfig:
    """The sleep settings of a training stage: the run's, with the stage's N and eviction where it sets them."""
    return config.sleep.model_copy(
        update={
            "eviction": stage.eviction or config.sleep.eviction,
            "passes": stage.passes or config.sleep.passes,
        }
    )


def build_stage_engine(parallelism: Parallelism, config: Config, stage: TrainingStage):
    """(A DeepSpeed engine over the parameters `stage` trains, the stage's sleep settings). Every
    training stage starts a fresh optimizer."""
    model = parallelism.model.model
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in stage.config.train))
    layout = _muon_layout(config, parallelism)
    optimizer = build_optimizer(model, config.optimizer, skips_on_overflow=config.train.zero_stage == 0, layout=layout)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, stage.end - stage.start))
    engine = parallelism.build_engine(optimizer, scheduler)
    stage_sleep = stage_sleep_settings(config, stage.config)
    # a ZeRO-3 partitioned parameter is empty here; ds_numel is its whole size
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    log.info(
        "stage %d %r: steps %d-%d, N=%d, eviction %s, %s trainable parameters",
        stage.index,
        stage.config.name,
        stage.start + 1,
        stage.end,
        stage_sleep.passes,
        stage_sleep.eviction,
        f"{trainable:,}",
    )
    return engine, stage_sleep


def _muon_layout(config: Config, parallelism: Parallelism) -> MuonLayout:
    """Muon shares its Newton-Schulz work over the data x tensor ranks of its stage, and at ZeRO-1/2 shards
    its state over the data ranks (`sleepscale.train.muon`)."""
    groups = parallelism.ctx.groups
    if config.optimizer.name == "muon" and config.train.zero_stage == 2:
        log.info("optimizer muon at train.zero_stage 2: state sharded as at ZeRO-1; gradients are reduced whole")
    return MuonLayout(
        data=dist.group.WORLD if groups is None else groups.data,
        tensor=None if groups is None else groups.tensor,
        shard_state=config.train.zero_stage > 0,
    )


def _save(run: Run, engine, loader_state: dict | None = None) -> None:
    """A checkpoint of the run; `loader_state`: where the data resumes (default: after the batches
    read so far)."""
    config = run.config
    trainer_state = {
        "progress": dataclasses.asdict(run.progress),
        "fingerprint": config.fingerprint(),
        **run.parallelism.layout(),
        "num_workers": config.data.num_workers,
        "config": config.model_dump(mode="json"),
    }
    shared_files = {}
    whole_model = run.parallelism.whole_model_state(engine)
    if whole_model is not None:
        shared_files[UNSHARDED] = {
            **whole_model,
            "lr_scheduler": engine.lr_scheduler.state_dict(),
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
        }
    rank_state = {"loader": loader_state or run.loader.state_dict(), "rng": rng_states()}
    if _state_per_rank(engine):
        rank_state["optimizer"] = engine.optimizer.state_dict()
    run.checkpointer.save(engine, run.progress.step, trainer_state, rank_state, shared_files)


def _restore(run: Run, engine, path: Path) -> None:
    """Model, optimizer, schedule, data position and RNG from a checkpoint, at the same tensor-parallel
    size through DeepSpeed, at another one through the checkpoint's unsharded state."""
    saved = json.loads((path / "trainer.json").read_text())
    ctx, saved_tensor = run.ctx, saved.get("tensor", 1)
    if saved_tensor == run.config.parallel.tensor:
        run.checkpointer.load(engine, path, optimizer=not _state_per_rank(engine))
    else:
        written = path / UNSHARDED  # by model-parallel runs
        state = (
            torch.load(written, map_location="cpu", weights_only=False)
            if written.exists()
            else _unsharded_from_deepspeed(run, engine, path)
        )
        run.parallelism.load_whole_model_state(engine, state)
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        engine.global_steps, engine.skipped_steps = state["global_steps"], state["skipped_steps"]
        log.info(
            "resumed a tensor-parallel %d checkpoint at tensor-parallel size %d",
            saved_tensor,
            run.config.parallel.tensor,
        )
    # Ranks are laid out tensor-fastest, and the ranks of one data rank saved the same data position.
    source = ctx.rank if saved_tensor == run.config.parallel.tensor else ctx.data_rank * saved_tensor
    rank_state = run.checkpointer.rank_state(path, source)
    run.loader.load_state_dict(rank_state["loader"])
    restore_rng_states(rank_state["rng"])
    if _state_per_rank(engine) and saved_tensor == run.config.parallel.tensor:
        engine.optimizer.load_state_dict(rank_state["optimizer"])


def _state_per_rank(engine) -> bool:
    """Whether the optimizer's state is saved by each rank itself (Muon: with ZeRO-1/2 each data rank
    holds its own part) rather than in DeepSpeed's files (one data rank's copy)."""
    return getattr(engine.optimizer, "state_per_rank", False)


def _unsharded_from_deepspeed(run: Run, engine, path: Path) -> dict:
    """The unsharded training state of a single-process-model ZeRO-0 checkpoint, whose DeepSpeed file
    holds the whole model and our optimizer's state (keyed by position, which the same
    `build_optimizer` over the unsplit model gives back)."""
    from sleepscale.parallel.tensor import unsharded_training_state  # megatron-core (~6 s): a resharding resume only

    saved = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    plain = HybridLM(run.config.model)
    plain.load_state_dict({name.removeprefix("model."): tensor for name, tensor in saved["module"].items()})
    trainable = {name for name, parameter in engine.module.model.named_parameters() if parameter.requires_grad}
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(name in trainable)
    optimizer = build_optimizer(plain, run.config.optimizer, skips_on_overflow=True)
    optimizer.load_state_dict(saved["optimizer"])
    return {
        **unsharded_training_state(plain, optimizer, None),
        "lr_scheduler": saved["lr_scheduler"],
        "global_steps": saved["global_steps"],
        "skipped_steps": saved["skipped_steps"],
    }


def _final_report(run: Run, engine, last_stage: TrainingStage) -> None:
    config, tracker, run_dir = run.config, run.tracker, Path(run.config.train.run_dir)
    rows = _evaluate(run, engine, stage_sleep_settings(config, last_stage.config))
    tracker.log_metrics({**_budget(run.progress), **eval_metrics(rows)}, run.progress.step)
    if run.ctx.is_main:
        table = format_table(rows)
        write_csv(rows, run_dir / "eval.csv")
        (run_dir / "eval.md").write_text(table + "\n")
        plot(rows, run_dir / "eval.png")
        names = ["config.yaml", "eval.csv", "eval.md", "eval.png"]
        history = [(record["step"], rows) for record, rows in evaluations(run_dir / "metrics.jsonl")]
        if len(history) > 1:  # periodic evaluation (eval.every, eval.at_steps)
            plot_history(history, run_dir / "eval_steps.png")
            names.append("eval_steps.png")
        for name in names:
            tracker.log_artifact(run_dir / name)
        print(f"\nvalidation accuracy by difficulty and N:\n{table}\n")
        where = f"MLflow run {tracker.run_id} in {tracker.uri}" if tracker.run_id else "MLflow off"
        print(f"run directory {run_dir}; {where}")
        if tracker.run_id and tracker.uri.startswith("sqlite:"):
            print(f"browse it with: mlflow ui --backend-store-uri {tracker.uri}")


def _evaluate(run: Run, engine, stage_sleep: SleepConfig) -> list[dict]:
    config = run.config
    loader = ShardLoader(
        run.data_path,
        "validation",
        batch_size=config.eval.batch_size,
        shuffle=False,
        seed=config.train.seed,
        shard_url_prefix=config.data.shard_url_prefix,
        rank=run.ctx.data_rank,
        world_size=run.ctx.data_size,
    )
    batches = _Limited(loader, config.eval.max_batches)
    was_training = engine.module.training
    engine.module.eval()
    forward = functools.partial(run.parallelism.evaluation_forward, engine)
    rows = evaluate(
        engine.module.model, batches, stage_sleep, config.eval.passes, forward=forward, group=run.ctx.data_group
    )
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


def _plan_stages(config: Config, loader: ShardLoader) -> list[TrainingStage]:
    stages, start = [], 0
    steps_per_epoch = max(1, loader.batches_per_epoch() // config.train.grad_accumulation)
    for index, stage in enumerate(config.stage_list()):
        length = stage.steps if stage.steps is not None else max(1, round(stage.epochs * steps_per_epoch))
        stages.append(TrainingStage(index, stage, start, start + length))
        start += length
    return stages


def _ensure_dataset(config: Config, ctx: Distributed) -> str:
    """The dataset path, generated first (by rank 0) if the config says how and it is missing."""
    if config.data is None:
        raise ConfigError("data: required for training (a dataset path written by `sleepscale data`)")
    if config.data.generate is not None and not (Path(config.data.path) / "manifest.json").exists():
        if ctx.is_main:
            log.info("generating %s data into %s", config.data.generate.task, config.data.path)
            generate_missing(config.data)
        dist.barrier()
    read_manifest(config.data.path)  # one-line DataError if it is not a dataset
    return config.data.path


def _check_vocabulary(config: Config, loader: ShardLoader) -> None:
    needed = loader.manifest["vocab_size"]
    if config.model.vocab_size < needed:
        raise ConfigError(
            f"model.vocab_size: {config.model.vocab_size} is smaller than the dataset's vocabulary ({needed})"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Metrics logged after the checkpoint we resume from will be logged again: drop them."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


# Scalars travel as tensors on the rank's device: NCCL reduces only device tensors.
def _step_flags(stop: bool, has_samples: bool, device: torch.device) -> tuple[bool, bool]:
    """(whether any rank was asked to stop, whether any rank has a real sample), in one all-reduce
    and one host read: the maximum over ranks of 2 * stop + has_samples. When no rank stops it is
    the maximum of has_samples; when one does, has_samples is not needed."""
    tensor = torch.tensor(2 * int(stop) + int(has_samples), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    value = int(tensor.item())
    return value >= 2, value == 1


def _progress_bar(ctx: Distributed, initial: int, stage: TrainingStage):
    # On rank 0 tqdm decides (None: shown on a terminal, not in a log file); other ranks never show one.
    return tqdm(
        total=stage.end,
        initial=initial,
        desc=f"stage {stage.index}",
        unit="step",
        disable=None if ctx.is_main else True,
        dynamic_ncols=True,
    )
