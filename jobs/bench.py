"""Benchmarks that print JSON (and write it with --out), measured in one run on this machine.

    python -m jobs.bench generate [--model smollm2] [--prompts 64] [--new-tokens 48]
    python -m jobs.bench dpo [--model smollm2] [--sequences 8] [--seq-len 256]

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


def _random_pairs(pairs: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0):
    """Synthetic pairs of exactly ``seq_len`` tokens each (throughput does not depend on the text)."""
    from actors.batch import collate_pairs

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(100, vocab, (n,), generator=g).tolist()

    prompts = [ids(prompt_len) for _ in range(pairs)]
    return collate_pairs(prompts, [ids(seq_len - prompt_len) for _ in range(pairs)],
                         [ids(seq_len - prompt_len) for _ in range(pairs)], pad_token_id=0)


def bench_dpo(args) -> dict:
    """One DPO optimizer step through a Ray PolicyActor vs the same class in this process."""
    import ray

    from actors.group import ActorGroup, ActorResources
    from actors.policy import PolicyActor
    from jobs.cluster import init_ray

    threads = args.threads or os.cpu_count() or 1
    pairs = args.sequences // 2
    kwargs = {"model": args.model, "optimizer": {"name": "rmsprop", "lr": 1e-6}, "micro_batch_size": args.micro_pairs,
              "autocast_bf16": args.bf16}
    loss = {"variant": "sigmoid", "beta": 0.1}
    ref = torch.full((pairs,), -400.0)

    def timed(step_fn, vocab):
        batch = _random_pairs(pairs, args.seq_len, args.prompt_len, vocab)
        step_fn(batch)  # warm-up: allocations, optimizer state
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            metrics = step_fn(batch)
            seconds = time.perf_counter() - start
            runs.append({"seconds": seconds, "tokens": metrics["tokens"], "tokens_per_s": metrics["tokens"] / seconds})
        return runs

    init_ray(args.address)
    group = ActorGroup(PolicyActor, "policy", resources=ActorResources(torch_threads=threads), init_kwargs=kwargs)
    info = group.wait_ready()[0]
    vocab = 49152 if args.model in ("smollm2", "tiny") else 32000
    actor_runs = timed(lambda b: group.run_one("train_dpo", b, ref, ref, loss), vocab)
    group.shutdown()
    ray.shutdown()

    torch.set_num_threads(threads)
    local = PolicyActor(torch_threads=threads, **kwargs)
    local_runs = timed(lambda b: local.train_dpo(b, ref, ref, loss), vocab)

    best_actor = max(r["tokens_per_s"] for r in actor_runs)
    best_local = max(r["tokens_per_s"] for r in local_runs)
    # Forward + backward of a dense decoder ~ 6 FLOPs per parameter per token (Kaplan et al. 2020).
    flops_per_token = 6 * info["parameters"]
    peak = matmul_gflops(threads=threads)
    return {"benchmark": "dpo", "model": args.model, "sequences": args.sequences, "seq_len": args.seq_len,
            "micro_pairs": args.micro_pairs, "bf16_autocast": args.bf16, "torch_threads": threads,
            "actor_runs": actor_runs, "in_process_runs": local_runs,
            "actor_tokens_per_s": best_actor, "in_process_tokens_per_s": best_local,
            "ratio_actor_vs_in_process": best_actor / best_local, "target_ratio": 0.9,
            "achieved_gflops": best_actor * flops_per_token / 1e9, "matmul_gflops_fp32": peak,
            "fraction_of_matmul_peak": best_actor * flops_per_token / 1e9 / peak,
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
    dpo = sub.add_parser("dpo", help="DPO step tokens/s through a Ray actor vs in-process, and fraction of peak")
    dpo.add_argument("--model", default="smollm2")
    dpo.add_argument("--sequences", type=int, default=8, help="sequences per step (chosen + rejected)")
    dpo.add_argument("--seq-len", type=int, default=256)
    dpo.add_argument("--prompt-len", type=int, default=64)
    dpo.add_argument("--micro-pairs", type=int, default=4)
    dpo.add_argument("--bf16", action="store_true")
    dpo.add_argument("--threads", type=int, default=None)
    dpo.add_argument("--repeats", type=int, default=2)
    for p in (gen, dpo):
        p.add_argument("--address", default=None)
        p.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = {"generate": bench_generate, "dpo": bench_dpo}[args.which](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
