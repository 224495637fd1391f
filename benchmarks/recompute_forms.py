"""What each recomputation form (`sleep.checkpoint`) keeps for backward and what its step costs, in one
process: the bytes the forward keeps (saved for backward, plus the matmul outputs `selective` caches),
and the median of alternating forward + backward steps, each form's as a ratio to `none`'s.

    python benchmarks/recompute_forms.py [--hidden 256] [--passes 4] [--rounds 3]

An AGAGAGAG model (4 attention + 4 GDN heads, MLP 3x), 4 sequences of 96 tokens in windows of 24,
fp32, one CPU thread. `selective (linear only)` keeps only the linear layers' products (mm, addmm)
and recomputes the attention and delta-rule cores: the alternative `sleepscale/model/recompute.py`
measured against before keeping every product.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_config, make_model  # noqa: E402

import sleepscale.model.recompute as recompute  # noqa: E402
from sleepscale.planner.activations import SavedStorages  # noqa: E402
from sleepscale.sleep import sleep_forward  # noqa: E402

EVERY_PRODUCT = frozenset(recompute._KEPT)
LINEAR_ONLY = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})
VARIANTS = [
    ("none", "none", EVERY_PRODUCT),
    ("pass", "pass", EVERY_PRODUCT),
    ("block", "block", EVERY_PRODUCT),
    ("nested", "nested", EVERY_PRODUCT),
    ("selective", "selective", EVERY_PRODUCT),
    ("selective (linear only)", "selective", LINEAR_ONLY),
]


def kept_bytes(model, config, tokens) -> int:
    """Saved for backward (distinct storages, parameters excluded) plus what selective's caches keep."""
    caches, original = [], recompute.create_selective_checkpoint_contexts

    def capturing(policy):
        forward, recomputation = original(policy)
        caches.append(forward.storage)
        return forward, recomputation

    recompute.create_selective_checkpoint_contexts = capturing
    try:
        counter = SavedStorages(model.parameters())
        with counter.counting():
            sleep_forward(model, tokens, config.sleep, targets=tokens.roll(-1, 1), return_logits=False)
    finally:
        recompute.create_selective_checkpoint_contexts = original
    seen, cached = set(counter.seen), 0
    for storage in caches:
        for outputs in storage.values():
            for kept in outputs.values():
                for tensor in tree_flatten(kept, is_leaf=lambda x: hasattr(x, "val"))[0]:
                    tensor = getattr(tensor, "val", tensor)
                    if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in seen:
                        seen.add(tensor.untyped_storage()._cdata)
                        cached += tensor.untyped_storage().nbytes()
    return counter.total + cached


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = torch.randint(0, 16, (4, 96), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, form, kept in VARIANTS:
        config = make_config(
            "AGAGAGAG",
            passes=args.passes,
            checkpoint=form,
            window=24,
            hidden_size=args.hidden,
            model={
                "intermediate_size": 3 * args.hidden,
                "attention": {"num_heads": 4, "num_kv_heads": 4},
                "gdn": {"num_heads": 4, "expand_v": 1.0},
            },
        )
        runs[name] = (config, make_model(config, dtype=torch.float32), kept)
    memory, times = {}, {name: [] for name in runs}
    for name, (config, model, kept) in runs.items():
        recompute._KEPT = kept
        memory[name] = kept_bytes(model, config, tokens)
    for round_ in range(args.rounds):  # alternating order, so that drift cancels
        for name, (config, model, kept) in list(runs.items())[:: 1 if round_ % 2 == 0 else -1]:
            recompute._KEPT = kept
            started = time.perf_counter()
            sleep_forward(model, tokens, config.sleep, targets=tokens.roll(-1, 1), return_logits=False).loss.backward()
            times[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    recompute._KEPT = EVERY_PRODUCT
    base = statistics.median(times["none"])
    print(
        f"`python benchmarks/recompute_forms.py --hidden {args.hidden} --passes {args.passes} --rounds {args.rounds}`"
    )
    print()
    print("| form | kept for backward MB | step s (median) | step / none |")
    print("|---|---|---|---|")
    for name in runs:
        step = statistics.median(times[name])
        print(f"| {name} | {memory[name] / 1e6:.2f} | {step:.3f} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
