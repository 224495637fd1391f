"""Muon, the paper's optimizer, under data, tensor and pipeline parallelism.

Muon for the 2-D hidden matrices (momentum, Nesterov, Newton-Schulz orthogonalisation of the whole
matrix), AdamW for every other parameter. One step, on every rank of a pipeline stage (its data x
tensor ranks), after DeepSpeed has averaged the gradients over the data group:

1. **Momentum.** The data rank that owns a Muon matrix updates its momentum, shard by shard on each
   tensor rank (the momentum is shaped like the rank's shard of the weight); without state sharding
   (`train.zero_stage 0`) every data rank does.
2. **Whole matrices.** On the owning data rank, the shards of the Nesterov input meet on the matrix's
   owning tensor rank (one gather over the tensor group), which runs Newton-Schulz on the whole
   matrix: exactly one rank of the job orthogonalises each matrix, so a shard is never
   orthogonalised alone, and the ranks share the work (owners by balanced assignment, `assign`,
   from the parameters' shapes alone: `sleepscale plan` computes the same owners).
3. **Update.** The update's shards go back to their tensor ranks (one scatter), each applies its own.
   AdamW parameters are updated, element-wise, by the data rank that owns them (every data rank at
   ZeRO-0).
4. **Share.** Each data rank broadcasts the weights it updated to the others, in one flat buffer
   (megatron-core's layer-wise distributed optimizer does the same with an all-gather).

So with state sharding each data rank holds the Muon momentum and AdamW moments of its own
parameters only (about 1/D of them), and the weights stay bit-identical across data ranks.

Why our own rather than DeepSpeed's or megatron-core's:
- DeepSpeed's `MuonWithAuxAdam` under ZeRO-1/2 runs on flat partitions (rank-divergent updates for
  matrices that cross a partition boundary: DeepSpeed issue 7807, refused since PR 8090), under ZeRO-3
  with gradient accumulation it runs Newton-Schulz per micro-batch (issue 8443), and under `zero.Init`
  it silently turns off (PR 8438). Here DeepSpeed runs at its stage 0 (it only averages gradients) and
  this optimizer owns the sharding, so none of these paths is taken.
- megatron-core 0.16.1's `TensorParallelMuon` and `LayerWiseDistributedOptimizer` are built on
  megatron's optimizer classes, DDP gradient buffers and `OptimizerConfig`, which DeepSpeed's engine
  does not drive, and `TensorParallelMuon` runs Newton-Schulz on every tensor rank (through
  `emerging-optimizers`) rather than once per matrix. We follow the layer-wise design (whole
  parameters owned by one data rank, then shared) in a `torch.optim.Optimizer`.

Update rule and state names are those of Keller Jordan's Muon as DeepSpeed ships it (`momentum_buffer`;
`exp_avg`, `exp_avg_sq`, `step`), so a ZeRO-0 checkpoint of DeepSpeed's Muon loads. Newton-Schulz runs
in `optimizer.muon_ns_dtype` (DeepSpeed's runs in half precision only).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from sleepscale.config import ConfigError, OptimizerConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic iteration


def newton_schulz(matrix: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor of `matrix` (2-D), in `dtype`,
    scaled by sqrt(max(1, rows / columns)) as Keller Jordan's Muon does; returned as float32."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.float() * max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5


def newton_schulz_flops(shape: tuple[int, int], steps: int) -> int:
    """Multiply-add FLOPs of `newton_schulz` on a matrix of `shape`: per step, the m x m Gram matrix,
    its square and the m x n product (m the short side)."""
    short, long = sorted(shape)
    return steps * 2 * (2 * short * short * long + short**3)


def assign_owners(costs: list[float], ranks: int, loads: list[float] | None = None) -> list[int]:
    """A balanced assignment of items with `costs` to `ranks` owners: largest first, each to the rank
    with the least load so far (ties to the lower rank). `loads`: each rank's load before these items;
    it is updated in place. Deterministic, so every rank computes the same assignment."""
    loads = [0.0] * ranks if loads is None else loads
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Who updates what (`assign`). `matrices`: each Muon matrix's Newton-Schulz rank, (data rank, tensor
    rank); `adam`: each AdamW parameter's data rank; `state`: the float32 state elements each data rank
    holds with state sharding (on each of its tensor ranks): one momentum per element of the Muon
    matrices it owns, exp_avg and exp_avg_sq per element of its AdamW parameters."""

    matrices: tuple[tuple[int, int], ...]
    adam: tuple[int, ...]
    state: tuple[int, ...]


def assign(
    muon: list[tuple[tuple[int, int], int]], adam: list[int], data: int, tensor: int, ns_steps: int
) -> Assignment:
    """The owners `Muon` uses, from shapes alone (the planner computes them too). `muon`: each Muon
    matrix's whole shape and this rank's elements of it (its tensor-parallel shard); `adam`: each AdamW
    parameter's elements on this rank; both in the optimizer's order. A Muon matrix goes to a (data,
    tensor) rank balanced by its Newton-Schulz FLOPs over the data x tensor ranks; an AdamW parameter to
    a data rank balanced by state elements on top of the Muon momentum each data rank holds."""
    flops = [newton_schulz_flops(shape, ns_steps) for shape, _ in muon]
    loads = [0.0] * data
    matrices = []
    for (_, elements), owner in zip(muon, assign_owners(flops, data * tensor)):
        matrices.append(divmod(owner, tensor))
        loads[owner // tensor] += elements  # one momentum per element
    adam_owners = assign_owners([2.0 * elements for elements in adam], data, loads)
    return Assignment(tuple(matrices), tuple(adam_owners), tuple(int(load) for load in loads))


@dataclasses.dataclass(frozen=True)
class MuonLayout:
    """Where the optimizer runs. `data`, `tensor`: this rank's data- and tensor-parallel groups (None:
    one rank); `shard_state`: each data rank keeps the state of the parameters it owns only (ZeRO-1/2),
    rather than all of it (ZeRO-0)."""

    data: dist.ProcessGroup | None = None
    tensor: dist.ProcessGroup | None = None
    shard_state: bool = False

    @property
    def data_size(self) -> int:
        return 1 if self.data is None else self.data.size()

    @property
    def data_rank(self) -> int:
        return 0 if self.data is None else self.data.rank()

    @property
    def tensor_size(self) -> int:
        return 1 if self.tensor is None else self.tensor.size()

    @property
    def tensor_rank(self) -> int:
        return 0 if self.tensor is None else self.tensor.rank()


def whole_shape(parameter: nn.Parameter, tensor_size: int) -> tuple[int, ...]:
    """The shape of the whole weight a (possibly tensor-parallel) parameter is a shard of."""
    shape = list(parameter.shape)
    if getattr(parameter, "tensor_model_parallel", False):
        shape[parameter.partition_dim] *= tensor_size
    return tuple(shape)


def _is_split(parameter: nn.Parameter) -> bool:
    return getattr(parameter, "tensor_model_parallel", False)


class SkipsOnOverflow:
    """`overflow = True` makes the next step() a no-op. DeepSpeed's engine reads the same flag to
    count the step as skipped and hold the LR schedule; its ZeRO optimizers set it themselves, the
    trainer's guard sets it for ours (`sleepscale.train.step`)."""

    overflow = False

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


class _Muon(torch.optim.Optimizer):
    """Muon for `muon` parameters and AdamW for `adam` ones, over `layout` (see the module's text).
    `newton_schulz_runs`: matrices this rank has orthogonalised."""

    state_per_rank = True  # the checkpoint keeps each rank's state (`state_dict`), not one data rank's

    def __init__(
        self,
        muon: list[nn.Parameter],
        adam: list[nn.Parameter],
        config: OptimizerConfig,
        layout: MuonLayout,
    ):
        groups = []
        if muon:
            groups.append(
                dict(
                    params=muon,
                    lr=config.muon_lr,
                    momentum=config.momentum,
                    weight_decay=config.weight_decay,
                    use_muon=True,
                )
            )
        if adam:
            groups.append(
                dict(params=adam, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=0.0, use_muon=False)
            )
        super().__init__(groups, {})
        self.layout, self.ns_steps = layout, config.muon_ns_steps
        self.ns_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.muon_ns_dtype]
        self.newton_schulz_runs = 0
        self.sent_bytes = 0  # payload this rank has put into the optimizer's collectives
        self._assign(muon, adam)

    def _assign(self, muon: list[nn.Parameter], adam: list[nn.Parameter]) -> None:
        """Owners: a Muon matrix's Newton-Schulz rank (data rank, tensor rank), balanced by its FLOPs over
        the data x tensor ranks; an AdamW parameter's data rank, balanced by state bytes on top of the
        Muon momentum each data rank holds."""
        data, tensor = self.layout.data_size, self.layout.tensor_size
        owners = assign(
            [(whole_shape(p, tensor), p.numel()) for p in muon], [p.numel() for p in adam], data, tensor, self.ns_steps
        )
        self.ns_owner = dict(zip(muon, owners.matrices))
        self.data_owner = {p: self.ns_owner[p][0] for p in muon} | dict(zip(adam, owners.adam))

    def holds_state(self, parameter: nn.Parameter) -> bool:
        return not self.layout.shard_state or self.data_owner[parameter] == self.layout.data_rank

    def sharding(self) -> dict:
        layout = self.layout
        return {
            "data_rank": layout.data_rank,
            "data_size": layout.data_size,
            "tensor_rank": layout.tensor_rank,
            "tensor_size": layout.tensor_size,
            "shard_state": layout.shard_state,
        }

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon takes no closure")
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adam_step)(group)
        self._share_updated()
        return None

    def _muon_step(self, group: dict) -> None:
        """Momentum wherever the state is held; then, on the owning data rank, every matrix's Nesterov
        input gathered whole on its Newton-Schulz rank (all gathers first, so that the tensor ranks
        orthogonalise their matrices at the same time), orthogonalised, and the updates scattered back
        and applied one by one. Beyond the momentum a rank holds, at its largest, the whole inputs and
        updates of the matrices it orthogonalises, one of each per matrix, plus one more update."""
        layout, beta = self.layout, group["momentum"]
        mine = []
        for p in group["params"]:
            if not self.holds_state(p):
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            momentum.lerp_(grad.float(), 1 - beta)
            if self.ns_owner[p][0] == layout.data_rank:
                mine.append(p)
        wholes = {p: self._gather_whole(self._nesterov(p, beta), p) for p in mine}
        updates = self._orthogonalise(wholes)
        for p in mine:
            update = self._scatter_update(updates.pop(p, None), p)
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update.to(p.dtype), alpha=-group["lr"])

    def _orthogonalise(self, wholes: dict) -> dict:
        """Newton-Schulz on each whole matrix gathered here (None: another tensor rank's), each input
        dropped as its update is made; none is left referenced when the updates are scattered."""
        updates = {}
        for p in list(wholes):
            whole = wholes.pop(p)
            if whole is not None:
                updates[p] = newton_schulz(whole, self.ns_steps, self.ns_dtype)
                self.newton_schulz_runs += 1
        return updates

    def _nesterov(self, parameter: nn.Parameter, beta: float) -> torch.Tensor:
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        return grad.float().lerp(self.state[parameter]["momentum_buffer"], beta)

    def _gather_whole(self, shard: torch.Tensor, parameter: nn.Parameter) -> torch.Tensor | None:
        """The whole matrix on its Newton-Schulz rank (None elsewhere): the tensor ranks' shards, gathered."""
        tensor, owner = self.layout.tensor, self.ns_owner[parameter][1]
        here = self.layout.tensor_rank == owner
        if tensor is None or tensor.size() == 1 or not _is_split(parameter):
            return shard if here else None
        pieces = [torch.empty_like(shard) for _ in range(tensor.size())] if here else None
        dist.gather(shard.contiguous(), pieces, dst=dist.get_global_rank(tensor, owner), group=tensor)
        self.sent_bytes += 0 if here else shard.numel() * shard.element_size()
        return torch.cat(pieces, dim=parameter.partition_dim) if here else None

    def _scatter_update(self, whole: torch.Tensor | None, parameter: nn.Parameter) -> torch.Tensor:
        """This tensor rank's part of the update its Newton-Schulz rank computed."""
        tensor, owner = self.layout.tensor, self.ns_owner[parameter][1]
        if tensor is None or tensor.size() == 1:
            return whole
        here, source = self.layout.tensor_rank == owner, dist.get_global_rank(tensor, owner)
        out = torch.empty(parameter.shape, dtype=torch.float32, device=parameter.device)
        if not _is_split(parameter):  # a replicated matrix: every tensor rank applies the whole update
            if here:
                out.copy_(whole)
                self.sent_bytes += out.numel() * out.element_size() * (tensor.size() - 1)
            dist.broadcast(out, source, group=tensor)
            return out
        pieces = [piece.contiguous() for piece in whole.chunk(tensor.size(), parameter.partition_dim)] if here else None
        dist.scatter(out, pieces, src=source, group=tensor)
        self.sent_bytes += out.numel() * out.element_size() * (tensor.size() - 1) if here else 0
        return out

    def _adam_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if not self.holds_state(p):
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            state = self.state[p]
            if not state:
                state["exp_avg"], state["exp_avg_sq"], state["step"] = torch.zeros_like(p), torch.zeros_like(p), 0
            state["step"] += 1
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].lerp_(grad.square(), 1 - beta2)
            first = state["exp_avg"] / (1 - beta1 ** state["step"])
            second = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
            update = first / (second.sqrt() + group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])

    def _share_updated(self) -> None:
        """Each data rank broadcasts the weights it updated (its Muon matrices, and with state sharding
        its AdamW parameters) to the other data ranks, one flat buffer per data rank."""
        data = self.layout.data
        if data is None or data.size() == 1:
            return
        parameters = [p for group in self.param_groups for p in group["params"]]
        shared = [p for p in parameters if p in self.ns_owner or self.layout.shard_state]
        for owner in range(data.size()):
            owned = [p for p in shared if self.data_owner[p] == owner]
            if not owned:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in owned])
            dist.broadcast(flat, dist.get_global_rank(data, owner), group=data)
            if owner == data.rank():
                self.sent_bytes += flat.numel() * flat.element_size() * (data.size() - 1)
                continue
            for p, value in zip(owned, flat.split([p.numel() for p in owned])):
                p.copy_(value.view_as(p))

    def state_dict(self) -> dict:
        """This rank's state (with state sharding, of the parameters it owns), what layout it belongs to,
        and the Newton-Schulz count; no collective (DeepSpeed calls it on one data rank)."""
        return {**super().state_dict(), "sharding": self.sharding(), "newton_schulz_runs": self.newton_schulz_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        sharding = state_dict.pop("sharding", None)
        self.newton_schulz_runs = state_dict.pop("newton_schulz_runs", 0)
        if self.layout.shard_state and sharding != self.sharding():
            raise ConfigError(
                f"optimizer: the checkpoint holds Muon state sharded as {sharding}, this rank is {self.sharding()}; "
                "resume at the layout that wrote it"
            )
        super().load_state_dict(state_dict)


class Muon(SkipsOnOverflow, _Muon):
    __doc__ = _Muon.__doc__
