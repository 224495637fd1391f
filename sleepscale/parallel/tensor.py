"""Tensor parallelism for the hybrid model, applied from outside it: `parallelize_tensor(model,
group)` swaps the model's linear layers, embedding, head and loss for megatron-core's parallel ones
and keeps this rank's contiguous 1/T of every split weight. The sleep engine runs unchanged.

What is split:
- attention: query heads and key/value heads (q/k/v projections and their biases by output rows,
  o_proj by columns, its bias added once after the reduction). With the output gate, q_proj's rows
  hold each head's query and gate together, so splitting by head splits both;
- Gated DeltaNet: key heads, each with its value heads (consecutive, so a rank's value heads are
  contiguous rows too). q/k/v/g/a/b projections by rows, the short convolutions by channel, the
  per-value-head decay parameters A_log and dt_bias by head, o_proj by columns. A rank's GDN state
  holds only its own value heads, so the recurrence, every sleep pass and every window, never
  communicates;
- SwiGLU: gate/up by rows, down by columns;
- embedding and LM head: by vocabulary, padded up to a multiple of T. Padded logits are masked out
  of megatron's vocab-parallel cross-entropy, so padding changes no value or gradient.
Communication per block pass: in forward, one all-reduce after each row-parallel layer (the mixer's
o_proj, the MLP's down_proj); in backward, one all-reduce of the input gradient per mixer and per
MLP. Megatron's column-parallel layers each all-reduce their own input's gradient (six for a GDN
mixer, whose q/k/v/g/a/b projections read the same input); here they are built with
`disable_grad_reduce` and the mixer's and MLP's input passes once through
`copy_to_tensor_model_parallel_region` (a forward pre-hook), so the partial gradients of all its
projections add up locally and are reduced once. (The projections stay separate layers, with fla's
and transformers' parameter names, so that checkpoints convert by renaming.)
Replicated: the RMSNorms. The per-head norms (GDN's output norm, attention's q_norm and k_norm) are
replicated but each rank applies them to its own heads only, so their gradients are summed over the
group.

Weights move between TP sizes through the unsharded form: `full_state_dict` gathers it (names as in
the unsharded model) and `load_full_state_dict` takes this rank's shard of it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from torch import nn

from sleepscale.config import ConfigError
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.model.attention import Attention
from sleepscale.model.hybrid import HybridLM

_PADDED_FROM = "_sleepscale_unpadded_rows"  # attribute on vocabulary-split parameters


def padded_vocab_size(vocab_size: int, size: int) -> int:
    return math.ceil(vocab_size / size) * size


def parallelize_tensor(model: HybridLM, group: dist.ProcessGroup) -> HybridLM:
    """In place. `group` must be megatron's tensor-parallel group (`sleepscale.parallel.groups`),
    which its vocab-parallel cross-entropy uses implicitly. On a meta-device model (built under
    `torch.device("meta")`, see `sleepscale.parallel.rank_model`) the shards stay on the meta device
    for `load_weights` to materialise; blocks, embedding or head already dropped for a pipeline stage
    (nn.Identity, None) are skipped."""
    size = group.size()
    problem = model.config.tensor_parallel_problem(size)
    if problem:
        raise ConfigError(f"parallel.tensor: {problem}")
    shard = _Sharder(group, next(model.parameters()).dtype)
    for block in model.layers:
        if isinstance(block, nn.Identity):
            continue
        mixer = block.attn
        shard.reduce_input_gradient_once(mixer)
        if isinstance(mixer, Attention):
            shard.columns(mixer, "q_proj", "k_proj", "v_proj")
            mixer.num_heads //= size
            mixer.num_kv_heads //= size
            head_norms = [mixer.q_norm, mixer.k_norm] if mixer.q_norm is not None else []
        else:
            shard.columns(mixer, "q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")
            for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
                conv.weight = shard.split(conv.weight, dim=0)
            mixer.A_log, mixer.dt_bias = shard.split(mixer.A_log, dim=0), shard.split(mixer.dt_bias, dim=0)
            mixer.num_heads //= size
            mixer.num_v_heads //= size
            mixer.key_dim //= size
            mixer.value_dim //= size
            head_norms = [mixer.o_norm]
        for norm in head_norms:
            norm.weight.register_hook(lambda grad: _summed_over(grad, group))
        mixer.o_proj = shard.row(mixer.o_proj)
        if block.mlp is not None:
            shard.reduce_input_gradient_once(block.mlp)
            shard.columns(block.mlp, "gate_proj", "up_proj")
            block.mlp.down_proj = shard.row(block.mlp.down_proj)

    vocab = model.config.vocab_size
    if model.embeddings is not None:
        model.embeddings = shard.embedding(model.embeddings, vocab)
    if model.lm_head is not None:
        model.lm_head = shard.column(model.lm_head, padded_rows=vocab)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embeddings.weight
    model.cross_entropy = VocabParallelCrossEntropy(vocab, group)
    return model


class VocabParallelCrossEntropy(nn.Module):
    """Summed cross-entropy of vocabulary-split logits (megatron's), with IGNORE_INDEX targets and
    the padded vocabulary entries left out."""

    def __init__(self, vocab_size: int, group: dist.ProcessGroup):
        super().__init__()
        self.vocab_size, self.group = vocab_size, group

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # A copy: megatron's cross-entropy works in place on its input, which the caller may still return.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        width = logits.shape[-1]
        vocab_ids = torch.arange(width, device=logits.device) + self.group.rank() * width
        logits = logits.masked_fill(vocab_ids >= self.vocab_size, torch.finfo(logits.dtype).min)
        scored = targets != IGNORE_INDEX
        losses = vocab_parallel_cross_entropy(logits, targets.masked_fill(~scored, 0))
        return losses.masked_fill(~scored, 0.0).sum()

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(logits, self.group)[..., : self.vocab_size]


def full_state_dict(model: nn.Module, group: dist.ProcessGroup, gradients: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights (or their gradients) under the unsharded model's state-dict names (tied
    weights under both), on every rank of the group; collective."""
    return {
        name: _unsharded((parameter.grad if gradients else parameter).detach(), parameter, group)
        for name, parameter in model.named_parameters(remove_duplicate=False)
    }


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], group: dist.ProcessGroup) -> None:
    """Copies this rank's shard of each unsharded weight into the tensor-parallel model."""
    for name, parameter in model.named_parameters():
        parameter.copy_(_sharded(full[name], parameter, group))


def unsharded_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, group: dist.ProcessGroup
) -> dict:
    """Weights and per-parameter optimizer state (e.g. Adam's moments; None without an optimizer) in
    unsharded form, keyed by parameter name, so that a run can resume at another tensor-parallel
    size; collective."""
    if optimizer is None:
        return {"weights": full_state_dict(model, group), "optimizer": None}
    optimizer_state = {}
    for name, parameter in model.named_parameters():
        state = optimizer.state.get(parameter, {})
        optimizer_state[name] = {
            key: _unsharded(value, parameter, group) if _shaped_like(value, parameter) else value
            for key, value in state.items()
        }
    # Hyperparameters per group (the scheduled lr among them); groups are built the same at any TP size.
    groups = [{key: value for key, value in settings.items() if key != "params"} for settings in optimizer.param_groups]
    return {"weights": full_state_dict(model, group), "optimizer": optimizer_state, "param_groups": groups}


@torch.no_grad()
def load_unsharded_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, group: dist.ProcessGroup
) -> None:
    """The inverse of `unsharded_training_state`, at this model's tensor-parallel size (1 included)."""
    load_full_state_dict(model, state["weights"], group)
    for settings, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        settings.update(saved)
    for name, parameter in model.named_parameters():
        saved = state["optimizer"][name]
        optimizer.state[parameter] = {
            key: _sharded(value, parameter, group).clone() if _shaped_like_full(value, parameter, group) else value
            for key, value in saved.items()
        }


def shard_slice(parameter: nn.Parameter, group: dist.ProcessGroup) -> tuple[int, int, int, int] | None:
    """Where this rank's shard lies in the unsharded tensor, for reading it alone (`load_weights`'s `shard`):
    (dim, start, stop, stored rows), where rows from `stored rows` to `stop` are vocabulary padding;
    None for a replicated parameter."""
    if not getattr(parameter, "tensor_model_parallel", False):
        return None
    dim, size = parameter.partition_dim, parameter.shape[parameter.partition_dim]
    start = group.rank() * size
    stored = getattr(parameter, _PADDED_FROM, size * group.size()) if dim == 0 else size * group.size()
    return dim, start, start + size, stored


def _shaped_like(value, parameter: nn.Parameter) -> bool:
    return torch.is_tensor(value) and value.shape == parameter.shape


def _shaped_like_full(value, parameter: nn.Parameter, group: dist.ProcessGroup | None) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and _sharded(value, parameter, group).shape == parameter.shape


def _unsharded(tensor: torch.Tensor, parameter: nn.Parameter, group: dist.ProcessGroup) -> torch.Tensor:
    if not getattr(parameter, "tensor_model_parallel", False):
        return tensor.clone()
    pieces = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    whole = torch.cat(pieces, dim=parameter.partition_dim)
    return whole[: getattr(parameter, _PADDED_FROM, whole.shape[0])]


def _sharded(whole: torch.Tensor, parameter: nn.Parameter, group: dist.ProcessGroup | None) -> torch.Tensor:
    if not getattr(parameter, "tensor_model_parallel", False):
        return whole
    padded = _padded(whole, getattr(parameter, _PADDED_FROM, None), group.size())
    return _shard_of(padded, parameter.partition_dim, group)


def _padded(tensor: torch.Tensor, unpadded_rows: int | None, size: int) -> torch.Tensor:
    if unpadded_rows is None:
        return tensor
    extra = padded_vocab_size(unpadded_rows, size) - unpadded_rows
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor


def _shard_of(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return tensor.chunk(group.size(), dim=dim)[group.rank()]


def _summed_over(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


class _Sharder:
    """Builds megatron's parallel layers holding this rank's shard of existing unsharded weights."""

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype):
        self.group = group
        # perform_initialization=False: the weights are copied in from the unsharded model.
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=group.size(),
            use_cpu_initialization=True,
            perform_initialization=False,
            params_dtype=dtype,
            gradient_accumulation_fusion=False,
        )

    def reduce_input_gradient_once(self, module: nn.Module) -> None:
        """The gradient of `module`'s input (its first argument) is all-reduced once, in backward; its
        column-parallel layers (`columns`) then leave theirs partial."""
        group = self.group
        module.register_forward_pre_hook(
            lambda _, args: (copy_to_tensor_model_parallel_region(args[0], group), *args[1:])
        )

    def columns(self, module: nn.Module, *names: str) -> None:
        """Column-parallel layers reading `module`'s input, whose gradient `reduce_input_gradient_once` reduces."""
        for name in names:
            setattr(module, name, self.column(getattr(module, name), reduces_input_gradient=False))

    def column(
        self, linear: nn.Linear, padded_rows: int | None = None, reduces_input_gradient: bool = True
    ) -> nn.Module:
        out_features, in_features = linear.weight.shape
        if padded_rows is not None:
            out_features = padded_vocab_size(out_features, self.group.size())
        layer = _ColumnParallelLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=_no_init,
            bias=linear.bias is not None,
            gather_output=False,
            tp_group=self.group,
            disable_grad_reduce=not reduces_input_gradient,
        )
        self._take_shard(layer.weight, linear.weight, dim=0, padded_rows=padded_rows)
        if linear.bias is not None:  # megatron splits the bias with the rows (and marks it so)
            with torch.no_grad():
                layer.bias.copy_(_shard_of(linear.bias.detach(), 0, self.group))
        return layer

    def row(self, linear: nn.Linear) -> nn.Module:
        out_features, in_features = linear.weight.shape
        layer = _RowParallelLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=_no_init,
            bias=linear.bias is not None,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.group,
        )
        self._take_shard(layer.weight, linear.weight, dim=1)
        if linear.bias is not None:  # megatron keeps the bias whole and adds it after the reduction
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def embedding(self, embedding: nn.Embedding, vocab_size: int) -> nn.Module:
        layer = VocabParallelEmbedding(
            padded_vocab_size(vocab_size, self.group.size()),
            embedding.embedding_dim,
            init_method=_no_init,
            config=self.config,
            tp_group=self.group,
        )
        self._take_shard(layer.weight, embedding.weight, dim=0, padded_rows=vocab_size)
        return layer

    def split(self, parameter: nn.Parameter, dim: int) -> nn.Parameter:
        shard = nn.Parameter(_shard_of(parameter.detach(), dim, self.group).clone())
        _mark_split(shard, dim)
        return shard

    @torch.no_grad()
    def _take_shard(self, target: nn.Parameter, source: torch.Tensor, dim: int, padded_rows: int | None = None) -> None:
        target.copy_(_shard_of(_padded(source.detach(), padded_rows, self.group.size()), dim, self.group))
        _mark_split(target, dim)
        if padded_rows is not None:
            setattr(target, _PADDED_FROM, padded_rows)


def _mark_split(parameter: nn.Parameter, dim: int) -> None:
    set_tensor_model_parallel_attributes(parameter, is_parallel=True, dim=dim, stride=1)


def _no_init(weight: torch.Tensor) -> None:
    pass


class _ColumnParallelLinear(ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]  # megatron returns (output, bias); our blocks expect the output


class _RowParallelLinear(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]
