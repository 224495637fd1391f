"""One validated configuration for a run, loaded from YAML with `key=value` overrides.

Every bad value fails with a `ConfigError` whose message is one line naming the field and what is
allowed, e.g. `model.pattern: unknown block letter 'X' at position 2 (allowed: A, a, G, g)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class AttentionConfig(Section):
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default: num_heads")
    head_dim: int | None = Field(None, ge=2, description="default: hidden_size // num_heads")
    rope_theta: float = Field(10000.0, gt=0)


class GDNConfig(Section):
    num_heads: int = Field(4, ge=1)
    head_dim: int | None = Field(None, ge=1, description="key dimension per head; default: hidden_size // num_heads")
    expand_v: float = Field(1.0, gt=0, description="value dimension per head = head_dim * expand_v")
    conv_size: int = Field(4, ge=1)


class ModelConfig(Section):
    vocab_size: int = Field(ge=2)
    hidden_size: int = Field(ge=2)
    pattern: str = Field(description="one letter per block: " + ", ".join(f"{k}={v}" for k, v in BLOCK_LETTERS.items()))
    loop: tuple[int, int] | None = Field(None, description="[start, end) of the blocks that sleep re-runs; default: all")
    intermediate_size: int | None = Field(None, ge=1, description="SwiGLU width; default: fla's rule")
    tie_embeddings: bool = False
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    seed: int = 0
    backend: Literal["auto", "torch", "fla"] = Field(
        "auto", description="gated delta rule kernels: auto = fla on CUDA, torch on CPU"
    )
    attention: AttentionConfig = AttentionConfig()
    gdn: GDNConfig = GDNConfig()

    @field_validator("pattern")
    @classmethod
    def _known_letters(cls, pattern: str) -> str:
        if not pattern:
            raise ValueError("must name at least one block (allowed letters: " + ", ".join(BLOCK_LETTERS) + ")")
        for position, letter in enumerate(pattern):
            if letter not in BLOCK_LETTERS:
                raise ValueError(
                    f"unknown block letter {letter!r} at position {position} (allowed: {', '.join(BLOCK_LETTERS)})"
                )
        return pattern

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        depth = len(self.pattern)
        start, end = self.loop_range
        if not 0 <= start < end <= depth:
            raise FieldError("loop", f"[{start}, {end}) is not a block range of the {depth}-block stack; need 0 <= start < end <= {depth}")
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
        value_dim = self.gdn_head_dim * self.gdn.expand_v
        if value_dim != int(value_dim):
            raise FieldError("gdn.expand_v", f"head_dim {self.gdn_head_dim} * expand_v {self.gdn.expand_v} is not an integer")
        return self

    @property
    def loop_range(self) -> tuple[int, int]:
        return self.loop if self.loop is not None else (0, len(self.pattern))

    @property
    def attention_kv_heads(self) -> int:
        return self.attention.num_kv_heads or self.attention.num_heads

    @property
    def attention_head_dim(self) -> int:
        return self.attention.head_dim or self.hidden_size // self.attention.num_heads

    @property
    def gdn_head_dim(self) -> int:
        return self.gdn.head_dim or self.hidden_size // self.gdn.num_heads

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        size = int(self.hidden_size * 4 * 2 / 3)  # fla's GatedMLP rule: 8/3 * hidden, rounded up to 256
        return 256 * ((size + 255) // 256)


class SleepConfig(Section):
    window: int = Field(ge=1, description="L: tokens per window; also the attention span")
    passes: int = Field(1, ge=1, description="N: passes over each evicted window (1 = the plain hybrid)")
    eviction: Literal["hard", "sliding"] = "hard"
    sleep_on: Literal["evicted", "context"] = Field(
        "evicted", description="evicted: every window before the last; context: only windows without loss tokens"
    )
    checkpoint: Literal["none", "pass", "window"] = "none"


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0


class Config(Section):
    model: ModelConfig
    sleep: SleepConfig
    train: TrainConfig = TrainConfig()


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
    for name in location:
        schema = schema.model_fields[name].annotation
    return schema


def validate(data: Any) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError("; ".join(_describe(e, Config) for e in error.errors())) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` sets data['a']['b']['c'] to value parsed as YAML (so 4 is an int, [0, 2] a list)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value, e.g. sleep.passes=4")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is a value, not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({error.problem})") from None
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections model and sleep")
    return validate(apply_overrides(data, list(overrides)))
