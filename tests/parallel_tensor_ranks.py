"""Run under torchrun: on every rank, the unsharded model and its tensor-parallel version over all
ranks, same initial weights, N=3 sleep; rank 0 writes the largest relative differences as JSON.

    torchrun --nproc_per_node 2 tests/parallel_tensor_ranks.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from conftest import make_config

from sleepscale.model import build_model
from sleepscale.model.gdn import GDNState
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.tensor import full_state_dict, load_full_state_dict, parallelize_tensor
from sleepscale.sleep import IGNORE_INDEX, sleep_forward

VOCAB = 39  # not a multiple of 2 or 4: the vocabulary gets padded


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


# The options of pretrained checkpoints: attention biases, q/k norms, output gate, partial rotary,
# zero-centred norms, and two GDN value heads per key head.
FEATURES = {
    "attention": {
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "rotary_fraction": 0.5,
        "qkv_bias": True,
        "output_bias": True,
        "qk_norm": True,
        "output_gate": True,
    },
    "gdn": {"num_heads": 4, "num_v_heads": 8, "expand_v": 1.5},
    "zero_centered_norms": True,
}


def build(config, dtype: torch.dtype):
    """The model, with the parameters that start at zero (biases, zero-centred norm weights) drawn
    at random, so that the comparison sees how they are split."""
    model = build_model(config.model).to(dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.5)
    return model


def compare(eviction: str, tie: bool, dtype: torch.dtype, init_std: float, features: bool, tp) -> dict:
    sections = (
        FEATURES
        if features
        else {"attention": {"num_heads": 4, "num_kv_heads": 2}, "gdn": {"num_heads": 4, "expand_v": 1.5}}
    )
    config = make_config(
        passes=3, eviction=eviction, vocab_size=VOCAB, model={**sections, "tie_embeddings": tie, "init_std": init_std}
    )
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 20), generator=generator)  # 3 windows of 8, the last one short
    targets = ids.roll(-1, dims=1)
    targets[:, :5] = IGNORE_INDEX

    reference = build(config, dtype)
    expected = sleep_forward(reference, ids, config.sleep, targets=targets, return_logits=True)
    expected.loss.backward()

    model = parallelize_tensor(build(config, dtype), tp)
    got = sleep_forward(model, ids, config.sleep, targets=targets, return_logits=True)
    got.loss.backward()
    grads, reference_grads = (
        full_state_dict(model, tp, gradients=True),
        dict(reference.named_parameters(remove_duplicate=False)),
    )
    heads = [(g, e) for g, e in zip(got.states, expected.states) if isinstance(g, GDNState)]
    local = heads[0][0].fast_weights.shape[1]

    plain = build_model(config.model.model_copy(update={"seed": 123})).to(dtype)
    plain.load_state_dict(full_state_dict(model, tp))  # TP -> unsharded
    resharded = parallelize_tensor(build_model(config.model.model_copy(update={"seed": 123})).to(dtype), tp)
    load_full_state_dict(resharded, dict(reference.state_dict()), tp)  # unsharded -> TP
    return {
        "logits": relative(got.logits, expected.logits),
        "loss": relative(got.loss.detach(), expected.loss.detach()),
        "grads": max(relative(grads[name], p.grad) for name, p in reference_grads.items()),
        "grad_names_match": sorted(grads) == sorted(reference_grads),
        "gdn_state_is_own_heads": all(
            relative(g.fast_weights, e.fast_weights[:, tp.rank() * local : (tp.rank() + 1) * local]) < 1e-5
            for g, e in heads
        )
        and local * tp.size() == config.model.gdn_v_heads,
        "tp_to_unsharded_loss": relative(
            sleep_forward(plain, ids, config.sleep, targets=targets).loss.detach(), got.loss.detach()
        ),
        "unsharded_to_tp_loss": relative(
            sleep_forward(resharded, ids, config.sleep, targets=targets).loss.detach(), expected.loss.detach()
        ),
    }


def collectives_per_block_pass(tp) -> dict:
    """Per block of an AGag model (attention and GDN, with and without MLP), one pass over a window
    and its backward: the all-reduces in forward and in backward, as element counts."""
    config = make_config(
        pattern="AGag",
        passes=1,
        vocab_size=VOCAB,
        model={"attention": {"num_heads": 4, "num_kv_heads": 2}, "gdn": {"num_heads": 4, "expand_v": 1.5}},
    )
    model = parallelize_tensor(build_model(config.model), tp)
    recorded, original = [], dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        recorded.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    counts = {}
    dist.all_reduce = all_reduce
    try:
        for index, block in enumerate(model.layers):
            x = torch.randn(2, 8, config.model.hidden_size, requires_grad=True)
            state = model.initial_states(2, config.sleep.window)[index]
            recorded.clear()
            out, _ = block(x, state)
            forward = list(recorded)
            recorded.clear()
            out.sum().backward()
            counts[config.model.blocks[index]] = {
                "forward": forward,
                "backward": sorted(recorded, reverse=True),
                "head_v_dim": getattr(block.attn, "head_v_dim", None),
            }
    finally:
        dist.all_reduce = original
    return counts


# The recomputation forms `recomputation_forms` checks against `checkpoint: none`, and the sleep options each
# runs with: the final pass alone with gradient under sliding eviction, and every pass with gradient.
FORMS = ("block", "nested", "selective")
FORM_OPTIONS = {"grad1-sliding": {"grad_passes": 1, "eviction": "sliding"}, "hard": {}}


def recomputation_forms(tp) -> dict:
    """Per recomputation form and options: whether the tensor-parallel model's loss, logits and every
    gradient (this rank's shards, on every rank) equal, bit for bit, those of the same tensor-parallel
    run with `checkpoint: none` (N=3)."""
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    targets = ids.roll(-1, dims=1)
    report = {}
    for name, options in FORM_OPTIONS.items():
        runs = {}
        for form in ("none", *FORMS):
            config = make_config(
                passes=3,
                checkpoint=form,
                vocab_size=VOCAB,
                model={"attention": {"num_heads": 4, "num_kv_heads": 2}, "gdn": {"num_heads": 4, "expand_v": 1.5}},
                **options,
            )
            model = parallelize_tensor(build(config, torch.float32), tp)
            out = sleep_forward(model, ids, config.sleep, targets=targets, return_logits=True)
            out.loss.backward()
            runs[form] = [out.loss.detach(), out.logits.detach(), *(p.grad for p in model.parameters())]
        for form in FORMS:
            equal = all(torch.equal(a, b) for a, b in zip(runs[form], runs["none"], strict=True))
            ranks = [None] * tp.size()
            dist.all_gather_object(ranks, equal, group=tp)
            report[f"{form}-{name}"] = all(ranks)
    return report


def main():
    dist.init_process_group("gloo")
    groups = init_parallel_groups(tensor=dist.get_world_size())
    # fp32 at a realistic init; fp64 at a large one, where fp32 rounding alone moves gradients by ~1e-3.
    # The options case in fp64 too: in fp32 its q/k norm weight gradients, sums that mostly cancel, differ by ~4e-5.
    cases = {
        "hard": ("hard", False, torch.float32, 0.02, False),
        "sliding": ("sliding", False, torch.float32, 0.02, False),
        "hard-tied": ("hard", True, torch.float32, 0.02, False),
        "sliding-fp64": ("sliding", False, torch.float64, 0.2, False),
        "sliding-features-fp64": ("sliding", False, torch.float64, 0.2, True),
    }
    report = {name: compare(*case, groups.tensor) for name, case in cases.items()}
    report["collectives"] = collectives_per_block_pass(groups.tensor)
    report["forms"] = recomputation_forms(groups.tensor)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as out:
            json.dump(report, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
