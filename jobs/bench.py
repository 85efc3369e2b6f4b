"""Benchmarks that print JSON (and write it with --out), measured in one run on this machine.

    python -m jobs.bench generate [--model smollm2] [--prompts 64] [--new-tokens 48]

Targets are checked here, never by timed assertions in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import time
from pathlib import Path

import torch


def matmul_gflops(size: int = 1024, dtype: torch.dtype = torch.float32, seconds: float = 2.0,
                  threads: int | None = None) -> float:
    """Measured dense matmul throughput (the machine's practical peak for MFU-style fractions)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    elapsed = time.perf_counter() - start
    torch.set_num_threads(previous)
    return 2 * size**3 * count / elapsed / 1e9


def machine_facts() -> dict:
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": py_platform.python_version(),
            "processor": py_platform.processor() or py_platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def review_prompts(tokenizer, count: int) -> list[list[int]]:
    openings = ["This movie was", "I went to see this film because", "The acting in this", "Honestly, the plot",
                "My friends told me", "The director of this picture", "From the first scene", "I rented this"]
    return [tokenizer(openings[i % len(openings)])["input_ids"] for i in range(count)]


def bench_generate(args) -> dict:
    from actors.generation import GenerationActor, SamplingConfig, generate_sharded
    from actors.group import ActorGroup, ActorResources
    from actors.models import load_tokenizer
    from jobs.cluster import init_ray

    init_ray(args.address)
    threads = args.threads or os.cpu_count() or 1
    tokenizer = load_tokenizer(args.model)
    prompts = review_prompts(tokenizer, args.prompts)
    # min_new_tokens-free sampling can stop early at EOS; tokens/s counts the tokens actually made.
    sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    group = ActorGroup(GenerationActor, "generator", resources=ActorResources(torch_threads=threads),
                       init_kwargs={"model": args.model, "backend": "hf", "dtype": args.dtype,
                                    "micro_batch_size": args.prompts})
    group.wait_ready()
    generate_sharded(group, prompts[:4], SamplingConfig(max_new_tokens=4))  # warm-up
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        completions = generate_sharded(group, prompts, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.response_ids) for c in completions)
        runs.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    group.shutdown()
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"benchmark": "generate", "backend": "hf", "model": args.model, "dtype": args.dtype,
            "prompts": args.prompts, "max_new_tokens": args.new_tokens, "torch_threads": threads,
            "runs": runs, "tokens_per_s": best["tokens_per_s"],
            "matmul_gflops_fp32": matmul_gflops(threads=threads),
            "machine": machine_facts()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    gen = sub.add_parser("generate", help="HF generation tokens/s through a Ray actor + matmul GFLOPS")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--prompts", type=int, default=64)
    gen.add_argument("--new-tokens", type=int, default=48)
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--repeats", type=int, default=2)
    for p in (gen,):
        p.add_argument("--address", default=None)
        p.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = {"generate": bench_generate}[args.which](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
