"""What converting and loading a pretrained checkpoint costs: time and peak memory.

    python benchmarks/convert_cost.py [--layers 16] [--work DIR]

1. Writes a synthetic Llama-family Hugging Face checkpoint (config.json + bfloat16 safetensors
   shards of random weights; 16 layers of width 2048: 1.1B parameters), not committed anywhere.
2. Converts it with `sleepscale convert` in one process: wall time and peak resident memory.
3. Loads the converted model directory on 2 tensor-parallel ranks (torchrun, gloo), once through
   `build_rank_model` (meta device, each rank reads its shards) and once the ordinary way (the
   whole model built and loaded on each rank, then sharded): per-rank peak resident memory against
   the whole model's float32 parameter bytes.
Prints a Markdown table. The peak is VmHWM of the process from the step's start (RSS counts
memory-mapped file pages while they are mapped, so it over- rather than under-states).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_synthetic_checkpoint(out: Path, layers: int) -> int:
    """A Llama checkpoint with random bfloat16 weights, written shard by shard; returns its parameter count."""
    from safetensors.torch import save_file

    hidden, intermediate, heads, kv_heads, vocab = 2048, 8192, 32, 8, 32000
    head_dim = hidden // heads
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 8192,
    }
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    weight_map, shard, shard_bytes, files = {}, {}, 0, 0
    generator = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, shard_bytes, files
        files += 1
        name = f"model-{files:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[name].nbytes
        if shard_bytes > 1 << 30:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(torch.Size(shape).numel() for shape in shapes.values())


def load_on_ranks(model_dir: Path, ordinary: bool) -> list[dict]:
    out = Path(tempfile.mkdtemp()) / "ranks.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        __file__,
        "--rank-load",
        str(model_dir),
        str(out),
        *(["--ordinary"] if ordinary else []),
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def rank_load(model_dir: str, out: str, ordinary: bool) -> None:
    """One torchrun rank: build this rank's tensor-parallel part and report its peak memory."""
    import torch.distributed as dist

    from sleepscale.config import validate
    from sleepscale.config_loading import with_init_source
    from sleepscale.model import build_model
    from sleepscale.model.hybrid import HybridLM
    from sleepscale.model.weights import load_weights
    from sleepscale.parallel.groups import init_parallel_groups
    from sleepscale.parallel.rank_model import build_rank_model
    from sleepscale.parallel.tensor import parallelize_tensor

    dist.init_process_group("gloo")
    groups = init_parallel_groups(2, 1)
    config = validate(
        with_init_source(
            {
                "model": {"init_from": model_dir},
                "sleep": {"window": 64},
                "train": {"steps": 1},
                "parallel": {"tensor": 2},
            }
        )
    )
    with torch.device("meta"):
        whole = sum(p.nbytes for p in HybridLM(config.model).parameters())
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before, started = _resident("VmRSS"), time.perf_counter()
    if ordinary:
        model = build_model(config.model)
        load_weights(model, model_dir)
        parallelize_tensor(model, groups.tensor)
    else:
        model = build_rank_model(config, groups, torch.device("cpu"))
    seconds = time.perf_counter() - started
    result = {
        "rank": dist.get_rank(),
        "peak": _resident("VmHWM") - before,
        "whole": whole,
        "seconds": seconds,
        "held": sum(p.nbytes for p in model.parameters()),
    }
    results = [None] * 2
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    parser.add_argument("--rank-load", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--ordinary", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_load:
        rank_load(*args.rank_load, args.ordinary)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="convert-cost-"))
    source, converted = work / "hf", work / "converted"
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(converted, ignore_errors=True)
    started = time.perf_counter()
    parameters = write_synthetic_checkpoint(source, args.layers)
    written = time.perf_counter() - started

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "convert", str(source), str(converted)],
        check=True,
        env={**os.environ},
        stdout=subprocess.DEVNULL,
    )
    convert_seconds = time.perf_counter() - started
    convert_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))

    rows = []
    for ordinary in (False, True):
        for result in load_on_ranks(converted, ordinary):
            rows.append(
                (
                    ("ordinary (whole model, then sharded)" if ordinary else "build_rank_model (meta, own shards)"),
                    result,
                )
            )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"synthetic Llama checkpoint: {parameters / 1e9:.2f}B parameters, {source_bytes / 2**30:.2f} GiB bfloat16 "
        f"(written in {written:.0f} s)\n"
    )
    print("| step | wall s | peak resident GiB | peak / whole fp32 model |")
    print("|---|---|---|---|")
    whole = rows[0][1]["whole"]
    print(f"| convert (1 process) | {convert_seconds:.1f} | {convert_peak / 2**30:.2f} | {convert_peak / whole:.2f} |")
    for label, result in rows:
        print(
            f"| load, TP=2 rank {result['rank']}: {label} | {result['seconds']:.1f} | {result['peak'] / 2**30:.2f} | "
            f"{result['peak'] / result['whole']:.2f} |"
        )
    print(f"\nwhole model in float32: {whole / 2**30:.2f} GiB; a rank's shards: {rows[0][1]['held'] / 2**30:.2f} GiB")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
