"""One validated configuration for a run: the schema (`Config` and its sections) and `validate`.

Every bad value fails with a `ConfigError` whose message is one line naming the field and what is
allowed, e.g. `model.pattern: unknown block letter 'X' at position 2 (allowed: A, a, G, g)`.

Reading a config file, `key=value` overrides and `model.init_from` are `sleepscale.config_loading`'s.
This module imports nothing of sleepscale (tests/test_imports.py holds it to that): every other
module may import it, so it sits at the root of the package's import graph, and the facts it checks
values against are defined here, e.g. the sizes the kernels take (`WINDOW_MAX_LENGTH`, ...).
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGE_BOUNDARY = "|"

# The sizes the gated-delta-rule kernels take. Defined here, where validation checks a config against
# them (this module imports nothing of sleepscale, nor torch or Triton); our window kernel
# (sleepscale/kernels/window_delta_rule.py) and the dispatcher (sleepscale.ops) read them from here.
WINDOW_MAX_LENGTH = 64  # our window kernel: one window of at most this many tokens
WINDOW_MAX_HEAD_DIM = 128  # ... with key and value head dimensions up to this
FLA_MAX_KEY_DIM = 256  # fla's gated delta rule kernels: key head dimensions up to this

# The layer-pattern alphabet (one letter per block; see sleepscale/model/blocks.py).
BLOCK_LETTERS = {
    "A": "attention + MLP",
    "a": "attention only",
    "G": "Gated DeltaNet + MLP",
    "g": "Gated DeltaNet only",
}


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


class FieldError(ValueError):
    """Raised inside a whole-section validator to blame one field of that section."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RopeScalingConfig(Section):
    """Llama 3's frequency-dependent RoPE scaling (transformers' rope_type 'llama3')."""

    kind: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> RopeScalingConfig:
        if self.high_freq_factor <= self.low_freq_factor:
            raise FieldError(
                "high_freq_factor", f"{self.high_freq_factor} must exceed low_freq_factor {self.low_freq_factor}"
            )
        return self


class AttentionConfig(Section):
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default: num_heads")
    head_dim: int | None = Field(None, ge=2, description="default: hidden_size // num_heads")
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScalingConfig | None = Field(None, description="Llama 3 RoPE scaling; default: none")
    rotary_fraction: float = Field(
        1.0, gt=0, le=1, description="share of each head's dimensions that are rotated (partial rotary; Qwen3.5: 0.25)"
    )
    qkv_bias: bool = Field(False, description="biases on the q/k/v projections (Qwen2)")
    output_bias: bool = Field(False, description="bias on the output projection (Llama with attention_bias)")
    qk_norm: bool = Field(False, description="RMSNorm over each head's query and key before rotary (Qwen3, Qwen3.5)")
    output_gate: bool = Field(
        False,
        description="q_proj also yields a per-head gate; output * sigmoid(gate) before o_proj (Qwen3-Next, Qwen3.5)",
    )


class GDNConfig(Section):
    num_heads: int = Field(4, ge=1)
    head_dim: int | None = Field(None, ge=1, description="key dimension per head; default: hidden_size // num_heads")
    expand_v: float = Field(1.0, gt=0, description="value dimension per head = head_dim * expand_v")
    num_v_heads: int | None = Field(
        None,
        ge=1,
        description="grouped value heads: a multiple of num_heads, each key head serving "
        "num_v_heads / num_heads consecutive value heads (Qwen3.5, OLMo-Hybrid); default: num_heads",
    )
    conv_size: int = Field(4, ge=1)


class ModelConfig(Section):
    init_from: str | None = Field(
        None,
        description="a model directory (`sleepscale convert`) whose weights a new run starts from; the rest of "
        "this section is filled from it, and what is given must agree with it",
    )
    vocab_size: int = Field(ge=2)
    hidden_size: int = Field(ge=2)
    pattern: str = Field(
        description="one letter per block: "
        + ", ".join(f"{k}={v}" for k, v in BLOCK_LETTERS.items())
        + "; a '|' marks a pipeline-stage boundary (ignored without pipeline parallelism)"
    )
    loop: tuple[int, int] | None = Field(
        None, description="[start, end) of the blocks that sleep re-runs; default: all"
    )
    intermediate_size: int | None = Field(None, ge=1, description="SwiGLU width; default: fla's rule")
    tie_embeddings: bool = False
    # 1e-6 as fla's GDN models and Qwen3-Next use: at width 64 and init_std 0.02 the GDN gated output
    # norm's input has a mean square of ~1.7e-5 at initialisation, which 1e-5 would swamp; from width
    # 512 on either is < 10% of it (benchmarks/results/norm_defaults.md, with the training runs).
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of every RMSNorm (blocks, final, GDN gated output)")
    zero_centered_norms: bool = Field(
        False,
        description="RMSNorms scale by (1 + weight), weights stored around zero (Qwen3-Next, Qwen3.5); the "
        "GDN gated output norm is not affected",
    )
    init_std: float = Field(0.02, gt=0)
    seed: int = 0
    backend: Literal["auto", "torch", "fla", "window"] = Field(
        "auto",
        description="gated delta rule kernels: auto = on CUDA our window kernel for trained calls of at most "
        "64 tokens and fla's otherwise, torch on CPU; fla = fla's only; window = ours only (windows <= 64 tokens)",
    )
    attention: AttentionConfig = AttentionConfig()
    gdn: GDNConfig = GDNConfig()

    @field_validator("pattern")
    @classmethod
    def _known_letters(cls, pattern: str) -> str:
        if not pattern.replace(STAGE_BOUNDARY, ""):
            raise ValueError("must name at least one block (allowed letters: " + ", ".join(BLOCK_LETTERS) + ")")
        for position, letter in enumerate(pattern):
            if letter not in BLOCK_LETTERS and letter != STAGE_BOUNDARY:
                raise ValueError(
                    f"unknown block letter {letter!r} at position {position} (allowed: {', '.join(BLOCK_LETTERS)}, "
                    f"and {STAGE_BOUNDARY} between pipeline stages)"
                )
        if "" in pattern.split(STAGE_BOUNDARY):
            raise ValueError(f"{pattern!r} has a pipeline stage without blocks; put at least one block between two '|'")
        return pattern

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        depth = len(self.blocks)
        start, end = self.loop_range
        if not 0 <= start < end <= depth:
            raise FieldError(
                "loop",
                f"[{start}, {end}) is not a block range of the {depth}-block stack; need 0 <= start < end <= {depth}",
            )
        for section, heads in (("attention", self.attention.num_heads), ("gdn", self.gdn.num_heads)):
            if self.hidden_size % heads:
                raise FieldError(f"{section}.num_heads", f"{heads} does not divide hidden_size {self.hidden_size}")
        if self.attention_kv_heads > self.attention.num_heads or self.attention.num_heads % self.attention_kv_heads:
            raise FieldError(
                "attention.num_kv_heads",
                f"{self.attention_kv_heads} must divide attention.num_heads {self.attention.num_heads}",
            )
        if self.attention_head_dim % 2:
            raise FieldError("attention.head_dim", f"{self.attention_head_dim} must be even (rotary embeddings)")
        if self.gdn_v_heads % self.gdn.num_heads:
            raise FieldError(
                "gdn.num_v_heads", f"{self.gdn_v_heads} must be a multiple of gdn.num_heads {self.gdn.num_heads}"
            )
        rotary = self.attention_head_dim * self.attention.rotary_fraction
        if rotary != int(rotary) or int(rotary) % 2:
            raise FieldError(
                "attention.rotary_fraction",
                f"head_dim {self.attention_head_dim} * {self.attention.rotary_fraction} "
                "must be an even integer (the rotated dimensions)",
            )
        value_dim = self.gdn_head_dim * self.gdn.expand_v
        if value_dim != int(value_dim):
            raise FieldError(
                "gdn.expand_v", f"head_dim {self.gdn_head_dim} * expand_v {self.gdn.expand_v} is not an integer"
            )
        if any(letter in "Gg" for letter in self.blocks):
            self._gdn_kernels_take(int(value_dim))
        return self

    def _gdn_kernels_take(self, value_dim: int) -> None:
        """The GDN head dimensions against the kernels `backend` can resolve to (on a GPU)."""
        if self.backend in ("auto", "fla") and self.gdn_head_dim > FLA_MAX_KEY_DIM:
            raise FieldError(
                "gdn.head_dim",
                f"{self.gdn_head_dim} is above {FLA_MAX_KEY_DIM}, the largest key head "
                f"dimension fla's kernels take (model.backend {self.backend} uses them on CUDA); use at most "
                f"{FLA_MAX_KEY_DIM}, or model.backend=torch (CPU)",
            )
        if self.backend == "window" and max(self.gdn_head_dim, value_dim) > WINDOW_MAX_HEAD_DIM:
            raise FieldError(
                "backend",
                f"window takes GDN head dimensions up to {WINDOW_MAX_HEAD_DIM}, got key "
                f"{self.gdn_head_dim} and value {value_dim}; use model.backend=auto (fla's kernels)",
            )

    def tensor_parallel_problem(self, size: int) -> str | None:
        """Why `size` tensor-parallel ranks cannot split this model's heads, or None."""
        counts = {
            "attention.num_heads": self.attention.num_heads,
            "attention.num_kv_heads": self.attention_kv_heads,
            "gdn.num_heads": self.gdn.num_heads,
        }
        for name, count in counts.items():
            if count % size:
                return f"{size} does not divide model.{name} ({count}); choose a divisor of it"
        return None

    def pipeline_problem(self, size: int) -> str | None:
        """Why the pattern's '|' marks do not give `size` pipeline stages, or None."""
        boundaries = self.pattern.count(STAGE_BOUNDARY)
        if size > 1 and boundaries != size - 1:
            return (
                f"parallel.pipeline {size} needs {size - 1} stage boundaries '|' in model.pattern, found {boundaries} "
                f"(e.g. {'|'.join(['GG'] * size)})"
            )
        return None

    @property
    def blocks(self) -> str:
        """The pattern's block letters, stage boundaries removed."""
        return self.pattern.replace(STAGE_BOUNDARY, "")

    @property
    def stage_ranges(self) -> list[range]:
        """The blocks of each pipeline stage, as the pattern's '|' marks split them."""
        ranges, start = [], 0
        for part in self.pattern.split(STAGE_BOUNDARY):
            ranges.append(range(start, start + len(part)))
            start += len(part)
        return ranges

    @property
    def loop_range(self) -> tuple[int, int]:
        return self.loop if self.loop is not None else (0, len(self.blocks))

    @property
    def attention_kv_heads(self) -> int:
        return self.attention.num_kv_heads or self.attention.num_heads

    @property
    def attention_head_dim(self) -> int:
        return self.attention.head_dim or self.hidden_size // self.attention.num_heads

    @property
    def gdn_v_heads(self) -> int:
        return self.gdn.num_v_heads or self.gdn.num_heads

    @property
    def attention_rotary_dim(self) -> int:
        return int(self.attention_head_dim * self.attention.rotary_fraction)

    @property
    def gdn_head_dim(self) -> int:
        return self.gdn.head_dim or self.hidden_size // self.gdn.num_heads

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        size = int(self.hidden_size * 4 * 2 / 3)  # fla's GatedMLP rule: 8/3 * hidden, rounded up to 256
        return 256 * ((size + 255) // 256)


class PassesDistribution(Section):
    """N drawn per training step (see sleepscale/passes.py)."""

    kind: Literal["uniform", "poisson_lognormal"]
    low: int = Field(1, ge=1, description="uniform: smallest N")
    high: int = Field(4, ge=1, description="uniform: largest N")
    mean: float = Field(3.0, gt=1, description="poisson_lognormal: mean N")
    sigma: float = Field(0.5, gt=0, description="poisson_lognormal: spread of the log-rate")
    max: int = Field(16, ge=1, description="poisson_lognormal: largest N")

    @model_validator(mode="after")
    def _ordered(self) -> PassesDistribution:
        if self.kind == "uniform" and self.low > self.high:
            raise FieldError("high", f"{self.high} is below low {self.low}")
        return self


class SleepConfig(Section):
    window: int = Field(ge=1, description="L: tokens per window; also the attention span")
    passes: int = Field(1, ge=1, description="N: passes over each evicted window (1 = the plain hybrid)")
    eviction: Literal["hard", "sliding"] = "hard"
    sleep_on: Literal["evicted", "context"] = Field(
        "evicted", description="evicted: every window before the last; context: only windows without loss tokens"
    )
    checkpoint: Literal["auto", "none", "pass", "window", "block", "nested", "selective"] = Field(
        "auto",
        description="activation checkpointing: the unit recomputed in backward (sleepscale/model/recompute.py): "
        "pass, block, nested (a pass, recomputed block by block), selective (each block, keeping its matmul "
        "outputs) or window; auto: pass when the model sleeps (N > 1 or random N), else none",
    )
    grad_passes: int | None = Field(
        None,
        ge=1,
        description="truncated backprop: only the last k of the N passes carry gradient (the wake pass always does)",
    )
    detach_every: int | None = Field(None, ge=1, description="stop gradient through the carried state every W windows")
    random_passes: PassesDistribution | None = Field(
        None, description="training only: draw N per step instead of `passes`"
    )
    state_norm_bound: float | None = Field(
        None,
        gt=0,
        description="rescale each GDN state (per sequence and head) to at most this norm after every sleep pass",
    )

    @property
    def checkpointing(self) -> Literal["none", "pass", "window", "block", "nested", "selective"]:
        """The checkpointing mode in effect. Per pass by default once the model sleeps: activation
        memory then stays flat in N (benchmarks/results/sleep_cost.md: 0.85 GB instead of 2.3 GB
        peak at N=8, for 1.1x the step time; at N=2, 1.4x)."""
        if self.checkpoint != "auto":
            return self.checkpoint
        return "pass" if self.passes > 1 or self.random_passes is not None else "none"

    @model_validator(mode="after")
    def _grad_passes_fit(self) -> SleepConfig:
        if self.grad_passes is not None and self.random_passes is None and self.grad_passes > self.passes:
            raise FieldError("grad_passes", f"{self.grad_passes} is more than passes {self.passes}")
        return self


class GenerateConfig(Section):
    """Data to generate when `data.path` holds no dataset yet (see `sleepscale data --help`)."""

    task: Literal["rule110", "depo", "math"]
    args: dict[str, Any] = Field(default_factory=dict, description="the task's options, e.g. {t_values: [0, 1]}")
    train_samples: int = Field(10000, ge=1)
    validation_samples: int = Field(1000, ge=1)
    samples_per_shard: int = Field(1000, ge=1)
    seed: int = 0


class DataConfig(Section):
    path: str = Field(description="a dataset directory (or manifest URL) written by `sleepscale data`")
    generate: GenerateConfig | None = None
    num_workers: int = Field(0, ge=0)
    skip_bad_samples: bool = False
    max_skipped_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="with skip_bad_samples: stop (exit 2) once more than this fraction of an epoch's samples "
        "was skipped",
    )
    shard_url_prefix: str | None = None


class OptimizerConfig(Section):
    name: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for 2-D hidden matrices, AdamW for the rest"
    )
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (with muon: embeddings, head, norms, gates, biases)")
    muon_lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.95, ge=0, lt=1, description="Muon momentum")
    muon_ns_steps: int = Field(5, ge=1, description="Newton-Schulz iterations per Muon update")
    muon_ns_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="precision of the Newton-Schulz iteration (float32: updates exact across layouts)"
    )
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)


class ScheduleConfig(Section):
    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")


class StageConfig(Section):
    name: str
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0, description="alternative to steps: passes over the training split")
    eviction: Literal["hard", "sliding"] | None = Field(None, description="default: sleep.eviction")
    passes: int | None = Field(None, ge=1, description="default: sleep.passes")
    train: list[str] = Field(["*"], min_length=1, description="fnmatch patterns of the parameter names that train")

    @model_validator(mode="after")
    def _one_length(self) -> StageConfig:
        if (self.steps is None) == (self.epochs is None):
            raise FieldError("steps", "give exactly one of steps and epochs")
        return self


class TrainConfig(Section):
    run_dir: str = Field(
        "runs/default", description="checkpoints, resolved config, MLflow store; a run resumes from it"
    )
    steps: int | None = Field(None, ge=1, description="length of the single stage when `stages` is empty")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro-step")
    grad_accumulation: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    tf32: bool = Field(
        True, description="fp32 runs on CUDA multiply in TF32 (10-bit mantissa, ~8x faster on Ampere and later)"
    )
    zero_stage: Literal[0, 1, 2, 3] = 0
    zero3_reuse_distance: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: a gathered parameter stays gathered while its next use is at most this many parameter "
        "elements ahead (DeepSpeed's stage3_max_reuse_distance; it bounds the parameters gathered at once); default: "
        "twice the loop blocks, coda and head, at most 1e9, so a window's N passes gather the loop once; lower it when "
        "that does not fit on a device (the loop is then gathered once per pass)",
    )
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    seed: int = 0
    log_every: int = Field(1, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="consecutive skipped (NaN/Inf or spike) steps that stop the run")
    loss_spike_ratio: float | None = Field(
        None, gt=1, description="skip a step whose loss exceeds this times the median of the last spike_window steps"
    )
    grad_spike_ratio: float | None = Field(
        None,
        gt=1,
        description="skip a step whose gradient norm exceeds this times the median of the last spike_window steps",
    )
    spike_window: int = Field(
        50, ge=1, description="accepted steps a spike is judged against (detection starts after them)"
    )
    compile: bool = Field(
        False,
        description="torch.compile each block once, its graph replayed for every window and pass "
        "(sleepscale/parallel/compile.py says what compiles)",
    )


class ParallelConfig(Section):
    """Model parallelism; data parallelism takes the remaining ranks (world size / (tensor x pipeline))."""

    tensor: int = Field(
        1, ge=1, description="tensor-parallel ranks: attention and GDN heads, MLP width and vocabulary split"
    )
    pipeline: int = Field(
        1,
        ge=1,
        description="pipeline stages, as model.pattern's '|' marks them; train.grad_accumulation micro-batches "
        "fill them",
    )
    pipeline_in_flight: int | None = Field(
        None,
        ge=1,
        description="most micro-batches holding activations on a stage at once (default: pipeline); "
        "2 x pipeline leaves smaller bubbles for twice the activation memory (benchmarks/results/pipeline.md)",
    )


class CheckpointConfig(Section):
    every: int = Field(100, ge=1, description="steps between checkpoints (one is also written at the end)")
    keep: int = Field(3, ge=1, description="how many of the latest checkpoints to keep")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: sqlite in the run directory")
    experiment: str = "sleepscale"
    run_name: str | None = None
    tags: dict[str, str] = Field(
        {}, description="extra MLflow run tags, e.g. tracking.tags.N=4 (a sweep sets its value)"
    )
    parent_run_id: str | None = Field(
        None, description="MLflow run this run is nested under (`sleepscale sweep` sets it)"
    )

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_values_as_text(cls, tags: Any) -> Any:
        # `tracking.tags.N=4` reads 4 as a number; MLflow tags are text.
        if isinstance(tags, dict):
            return {key: value if isinstance(value, (str, dict, list)) else str(value) for key, value in tags.items()}
        return tags


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="steps between evaluations; 0: only at the end")
    at_steps: list[int] = Field(
        [], description="steps after which to evaluate too, e.g. a shorter run's end (`sweep --equal-flops`)"
    )
    passes: list[int] = Field([1], min_length=1, description="sleep passes N to evaluate")
    batch_size: int = Field(32, ge=1)
    max_batches: int | None = Field(None, ge=1, description="per rank; default: the whole validation split")

    @field_validator("passes")
    @classmethod
    def _positive(cls, passes: list[int]) -> list[int]:
        if min(passes) < 1:
            raise ValueError(f"every N must be >= 1, got {passes}")
        return passes

    @field_validator("at_steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if steps and min(steps) < 1:
            raise ValueError(f"every step must be >= 1, got {steps}")
        return sorted(set(steps))

    def due(self, step: int) -> bool:
        """Whether a periodic evaluation follows `step` (the run's last step has the final one)."""
        return bool(self.every and step % self.every == 0) or step in self.at_steps


class Config(Section):
    model: ModelConfig
    sleep: SleepConfig
    data: DataConfig | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    stages: list[StageConfig] = Field(default_factory=list, description="default: one stage of train.steps")
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _trainable(self) -> Config:
        if not self.stages and self.train.steps is None:
            raise FieldError("train.steps", "required when no stages are given")
        if self.optimizer.name == "muon" and self.train.zero_stage == 3:
            raise FieldError(
                "train.zero_stage",
                "3 with optimizer muon: ZeRO-3 splits every weight over the data ranks, Muon orthogonalises whole "
                "matrices; use zero_stage 1 or 2 (Muon's state is sharded by whole matrices there)",
            )
        if self.train.grad_spike_ratio is not None and (
            self.deepspeed_zero_stage != 0 or self.train.precision != "fp32"
        ):
            raise FieldError(
                "train.grad_spike_ratio",
                "needs zero_stage 0 (or optimizer muon) and precision fp32 (DeepSpeed's ZeRO and bf16 optimizers "
                "take the gradient norm inside their own step, too late to skip it); use loss_spike_ratio there",
            )
        problem = self.model.tensor_parallel_problem(self.parallel.tensor)
        if problem:
            raise FieldError("parallel.tensor", problem)
        if self.parallel.tensor > 1 and self.train.zero_stage == 3:
            raise FieldError(
                "parallel.tensor", "tensor parallelism needs train.zero_stage <= 2 (ZeRO-3 would shard the shards)"
            )
        problem = self.model.pipeline_problem(self.parallel.pipeline)
        if problem:
            raise FieldError("model.pattern", problem)
        if self.parallel.pipeline > 1:
            self._check_pipeline()
        if self.train.zero_stage == 3 and len({tuple(stage.train) for stage in self.stages}) > 1:
            raise FieldError("stages", "stages that train different parameters need train.zero_stage <= 2")
        if self.train.zero_stage == 3 and self.sleep.checkpoint == "selective":
            raise FieldError(
                "sleep.checkpoint",
                "selective with train.zero_stage 3: ZeRO-3 gathers weights inside each block, which selective "
                "checkpointing would cache or replay; use block or nested (or zero_stage <= 2)",
            )
        if self.train.compile:
            self._check_compile()
        if self.model.backend == "window" and self.sleep.window > WINDOW_MAX_LENGTH:
            raise FieldError(
                "model.backend",
                f"window runs windows of at most {WINDOW_MAX_LENGTH} tokens, sleep.window is "
                f"{self.sleep.window}; use model.backend=auto (fla's chunked kernel beyond)",
            )
        return self

    def _check_compile(self) -> None:
        """What `train.compile` cannot compile yet (`sleepscale.parallel.compile`), refused in one line."""
        refused = [
            ("parallel.tensor", self.parallel.tensor > 1, "tensor parallelism's collectives are not compiled yet"),
            (
                "train.zero_stage",
                self.train.zero_stage == 3,
                "ZeRO-3 gathers weights in hooks around each block, "
                "which a compiled block does not run; use zero_stage <= 2",
            ),
            (
                "sleep.checkpoint",
                self.sleep.checkpoint == "selective",
                "selective checkpointing's dispatch mode "
                "does not run inside a compiled block; use none, pass, block, nested or window",
            ),
        ]
        for field, problem, why in refused:
            if problem:
                raise FieldError(
                    field, f"{functools.reduce(getattr, field.split('.'), self)} with train.compile: {why}"
                )

    def _check_pipeline(self) -> None:
        pipeline = f"parallel.pipeline {self.parallel.pipeline}"
        if self.train.zero_stage == 3:
            raise FieldError(
                "train.zero_stage",
                f"3 with {pipeline}: ZeRO-3 partitions every parameter over all ranks "
                "and gathers it around each module call, which excludes model parallelism; use 0, 1 or 2",
            )
        if self.sleep.checkpoint == "window":
            raise FieldError(
                "sleep.checkpoint",
                f"window with {pipeline}: a window spans stages and recomputing it would re-communicate; use pass",
            )
        if self.model.tie_embeddings:
            raise FieldError(
                "model.tie_embeddings",
                f"true with {pipeline}: the embedding and the head live on different stages; untie them",
            )

    @property
    def deepspeed_zero_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs: `train.zero_stage`, except with Muon, which shards its own
        state over the data ranks by whole matrices (`sleepscale.train.muon`): DeepSpeed then only
        averages gradients (its stage 0), and its ZeRO-1/2/3 Muon paths, with their known defects,
        are never taken."""
        return 0 if self.optimizer.name == "muon" else self.train.zero_stage

    def stage_list(self) -> list[StageConfig]:
        """The stages, or the single default stage."""
        return self.stages or [StageConfig(name="train", steps=self.train.steps)]

    def fingerprint(self) -> str:
        """Hash of what a resumed run must share with the run it resumes (not tracking, eval, logging)."""
        shared = self.model_dump(mode="json", include={"model", "sleep", "data", "optimizer", "schedule", "stages"})
        if self.optimizer.name != "muon":  # settings added with our Muon: AdamW runs written before still resume
            for key in ("muon_ns_steps", "muon_ns_dtype"):
                del shared["optimizer"][key]
        shared["train"] = self.train.model_dump(
            mode="json",
            include={"micro_batch_size", "grad_accumulation", "precision", "zero_stage", "grad_clip", "seed"},
        )
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    location = [str(part) for part in error["loc"]]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        location.append(cause.field)
        message = str(cause)
    elif error["type"] == "extra_forbidden":
        message = "unknown key (allowed: " + ", ".join(_section_at(schema, location[:-1]).model_fields) + ")"
    elif error["type"] == "missing":
        message = "required, but not given"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(location) or 'config'}: {message}"


def _section_at(schema: type[BaseModel], location: list[str]) -> type[BaseModel]:
    """The section class at a validation-error location such as ['stages', '0']."""
    for name in location:
        if name.isdigit():  # an item of a list of sections
            continue
        annotation = schema.model_fields[name].annotation
        candidates = [annotation, *typing.get_args(annotation)]  # unwraps `X | None` and `list[X]`
        schema = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    return schema


def validate(data: Any) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError("; ".join(_describe(e, Config) for e in error.errors())) from None


# Model fields a run may set differently from its `model.init_from` source (they change no weight's meaning).
FREE_OF_SOURCE = ("init_from", "seed", "backend", "loop", "init_std")
