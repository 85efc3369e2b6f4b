"""Benchmarks that print JSON (and write it with --out), measured in one run on this machine.

    python -m jobs.bench generate [--model smollm2] [--backend hf,vllm] [--num-generators 1,2] [--prompts 64]
    python -m jobs.bench dpo [--model smollm2] [--sequences 8] [--seq-len 256]
    python -m jobs.bench dpo --peer trl [--model smollm2] [--pairs 8] [--seq-len 256] [--bf16]
    python -m jobs.bench ppo [--model smollm2] [--prompts 16] [--new-tokens 48]
    python -m jobs.bench ppo --compare [--fast lora,critic_freeze,gen_threads] [--levers all] [--steps 3]
    python -m jobs.bench sync [--model smollm2] [--backend vllm] [--rounds 3]
    python -m jobs.bench memory [--model smollm2] [--settings baseline,gradient_checkpointing,...] [--pairs 4]

Targets are checked here, never by timed assertions in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from jobs.benchmarks.ppo import add_parser as add_ppo_parser
from jobs.benchmarks.ppo import bench_ppo
from jobs.benchmarks.sync import add_parser as add_sync_parser
from jobs.benchmarks.sync import bench_sync
from jobs.benchmarks.trl_peer import bench_dpo_peer


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


_SCALING_PROBE = """
import sys, time, torch
torch.set_num_threads(1)
if sys.argv[2] == "stream":  # 512 MiB read from memory on every pass, as decoding reads the weights
    x = torch.randn(2**27)
    op, work = x.sum, x.numel() * 4
else:  # a matmul whose operands stay in cache: compute-bound
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    op, work = (lambda: a @ b), 2 * 256**3
op()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < float(sys.argv[1]):
    op()
    n += 1
print(work * n / (time.perf_counter() - start) / 1e9)
"""


def core_scaling(seconds: float = 5.0) -> dict:
    """How this machine scales from one busy core to two, for memory-bound and compute-bound work: a
    single-threaded probe pinned to core 0, then two at once on cores 0 and 1 (Linux; two cores).

    ``stream`` reads 512 MiB per pass (GB/s), as decoding reads every weight per step; ``matmul``
    stays in cache (GFLOPS). Two generators can scale no better than ``stream`` for the part of a
    step that is bandwidth-bound, and no better than ``matmul`` for the rest."""
    import subprocess
    import sys

    def run(kind: str, cores: list[int]) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", _SCALING_PROBE, str(seconds), kind], stdout=subprocess.PIPE,
                                  text=True, preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}))
                 for core in cores]
        return [float(p.communicate()[0].strip()) for p in procs]

    result = {}
    for kind in ("stream", "matmul"):
        one, two = run(kind, [0]), run(kind, [0, 1])
        result[kind] = {"one_core": one[0], "two_cores": two, "scaling_2_vs_1": sum(two) / one[0]}
    return result


def machine_facts() -> dict:
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": py_platform.python_version(),
            "processor": py_platform.processor() or py_platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def review_prompts(tokenizer, count: int) -> list[list[int]]:
    openings = ["This movie was", "I went to see this film because", "The acting in this", "Honestly, the plot",
                "My friends told me", "The director of this picture", "From the first scene", "I rented this"]
    return [tokenizer(openings[i % len(openings)])["input_ids"] for i in range(count)]


def _generation_config(args, backend: str, generators: int) -> dict:
    """Tokens/s of one (backend, generator count) on the same prompts, then weight-sync seconds."""
    import ray

    from actors.generation import GenerationActor, generate_sharded
    from actors.sampling import SamplingConfig
    from actors.group import ActorGroup, ActorResources
    from actors.models import load_causal_lm, load_tokenizer

    threads = args.threads or max(1, (os.cpu_count() or 1) // generators)
    tokenizer = load_tokenizer(args.model)
    prompts = review_prompts(tokenizer, args.prompts)
    # min_new_tokens-free sampling can stop early at EOS; tokens/s counts the tokens actually made.
    sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    options = ({"max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib} if backend == "vllm" else None)
    group = ActorGroup(GenerationActor, f"bench-{backend}-{generators}g", num_actors=generators, indexed_names=True,
                       resources=ActorResources(torch_threads=threads, pin_cores=args.pin_cores),
                       init_kwargs={"model": args.model, "backend": backend, "dtype": args.dtype,
                                    "micro_batch_size": args.prompts, "backend_options": options})
    try:
        infos = group.wait_ready()
        generate_sharded(group, prompts[:4], SamplingConfig(max_new_tokens=4))  # warm-up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            completions = generate_sharded(group, prompts, sampling)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.response_ids) for c in completions)
            runs.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
        # Weight sync as PPO does it: the policy's state dict through the object store to every generator.
        weights = ray.put({k: v.detach().clone() for k, v in load_causal_lm(args.model, dtype="float32").state_dict().items()})
        syncs = []
        for version in range(1, args.sync_repeats + 1):
            start = time.perf_counter()
            results = group.run_all("update_weights", weights, version)
            syncs.append({"wall_s": time.perf_counter() - start, "in_actor_s": max(r["seconds"] for r in results)})
        group.run_all("close")
    finally:
        group.shutdown()
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"backend": backend, "generators": generators, "torch_threads_per_generator": threads,
            "cpu_cores": [i.get("cpu_cores") for i in infos],
            "engine_start_s": max(i["start_seconds"] for i in infos), "weight_sync_path": infos[0]["weight_sync"],
            "runs": runs, "tokens_per_s": best["tokens_per_s"], "weight_sync": syncs,
            "weight_sync_s": min(s["wall_s"] for s in syncs)}


def bench_generate(args) -> dict:
    """Each --backend x each --num-generators on the same prompts; ratios when both ends were run."""
    from actors.generation import resolve_backend
    from jobs.run.cluster import init_ray

    init_ray(args.address)
    backends = [resolve_backend(b.strip()) for b in args.backend.split(",")]
    counts = [int(g) for g in str(args.num_generators).split(",")]
    configs = [_generation_config(args, b, g) for b in backends for g in counts]
    by_key = {(c["backend"], c["generators"]): c["tokens_per_s"] for c in configs}
    ratios = {}
    for g in counts:
        if ("hf", g) in by_key and ("vllm", g) in by_key:
            ratios[f"vllm_vs_hf_tokens_per_s_{g}gen"] = by_key[("vllm", g)] / by_key[("hf", g)]
    for b in backends:
        if (b, 1) in by_key and (b, 2) in by_key:
            ratios[f"scale_out_2_vs_1_{b}"] = by_key[(b, 2)] / by_key[(b, 1)]
    first = configs[0]
    scaling = core_scaling() if args.pin_cores and 2 in counts and (os.cpu_count() or 1) >= 2 else None
    if scaling:
        ratios.update({f"machine_{kind}_2_vs_1_cores": v["scaling_2_vs_1"] for kind, v in scaling.items()})
    return {"benchmark": "generate", "backend": first["backend"], "model": args.model, "dtype": args.dtype,
            "prompts": args.prompts, "max_new_tokens": args.new_tokens,
            "torch_threads": first["torch_threads_per_generator"], "runs": first["runs"],
            "tokens_per_s": first["tokens_per_s"], "weight_sync_s": first["weight_sync_s"],
            "engine_start_s": first["engine_start_s"], "configurations": configs, "ratios": ratios,
            "targets": {"vllm_vs_hf": 1.3, "scale_out_2_vs_1": 1.7},
            "matmul_gflops_fp32": matmul_gflops(threads=first["torch_threads_per_generator"]),
            "core_scaling": scaling,
            "load_average_1m": os.getloadavg()[0], "machine": machine_facts()}


def _random_pairs(pairs: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0):
    """Synthetic pairs of exactly ``seq_len`` tokens each (throughput does not depend on the text)."""
    from actors.math.batch import collate_pairs

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(100, vocab, (n,), generator=g).tolist()

    prompts = [ids(prompt_len) for _ in range(pairs)]
    return collate_pairs(prompts, [ids(seq_len - prompt_len) for _ in range(pairs)],
                         [ids(seq_len - prompt_len) for _ in range(pairs)], pad_token_id=0)


def bench_dpo(args) -> dict:
    """One DPO optimizer step through a Ray PolicyActor vs the same class in this process; with
    ``--peer trl``, this project's step against TRL's DPOTrainer on the same pairs instead."""
    if args.peer == "trl":
        return bench_dpo_peer(args, matmul_gflops)
    import ray

    from actors.group import ActorGroup, ActorResources
    from actors.policy import PolicyActor
    from jobs.run.cluster import init_ray

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


# Each memory saver as PolicyActor options; "all" combines them. offload_optimizer moves AdamW state
# off the accelerator, so it is measured on CUDA only (a no-op on a CPU-only machine).
MEMORY_SETTINGS = {
    "baseline": {},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "bf16_autocast": {"autocast_bf16": True},
    "packing": {"packing": True},
    "lora": {"lora": {"r": 8}},
    "offload_optimizer": {"offload_optimizer": True},
    "all": {"gradient_checkpointing": True, "autocast_bf16": True, "packing": True, "lora": {"r": 8}},
}


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _variable_pairs(pairs: int, seq_len: int, prompt_len: int, min_frac: float, vocab: int, seed: int = 0):
    """Pairs whose responses vary in length (from ``min_frac`` of the longest), so batches carry padding."""
    from actors.math.batch import collate_pairs

    g = torch.Generator().manual_seed(seed)
    longest = seq_len - prompt_len
    shortest = max(1, int(longest * min_frac))

    def ids():
        n = int(torch.randint(shortest, longest + 1, (1,), generator=g))
        return torch.randint(100, vocab, (n,), generator=g).tolist()

    prompts = [torch.randint(100, vocab, (prompt_len,), generator=g).tolist() for _ in range(pairs)]
    return collate_pairs(prompts, [ids() for _ in range(pairs)], [ids() for _ in range(pairs)], pad_token_id=0)


def _memory_child(args) -> dict:
    """One setting in this (fresh) process: DPO steps, then the process's peak memory."""
    import resource

    from actors.policy import PolicyActor

    options = MEMORY_SETTINGS[args.child]
    cuda = torch.cuda.is_available()
    start_mib = _rss_mib()
    policy = PolicyActor(args.model, torch_threads=args.threads or os.cpu_count() or 1,
                         optimizer={"name": "adamw", "lr": 1e-6}, micro_batch_size=args.micro_pairs, **options)
    loaded_mib = _rss_mib()
    vocab = len(policy.tokenizer)
    batch = _variable_pairs(args.pairs, args.seq_len, args.prompt_len, args.min_len_frac, vocab)
    # The reference is the starting policy (a LoRA policy's adapter-disabled base): the loss starts at log 2.
    ref = (policy.reference_logprobs(batch) if policy.lora else policy.logprobs(batch))["sum"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for _ in range(args.steps):
        begin = time.perf_counter()
        metrics = policy.train_dpo(batch, ref[:args.pairs], ref[args.pairs:], {"variant": "sigmoid", "beta": 0.1})
        seconds.append(time.perf_counter() - begin)
        losses.append(metrics["loss"])
    result = {"setting": args.child, "options": options, "device": "cuda" if cuda else "cpu",
              "process_start_rss_mib": start_mib, "model_loaded_rss_mib": loaded_mib,
              # ru_maxrss is in KiB on Linux: the highest resident set of this process over its life.
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "trainable_parameters": sum(p.numel() for p in policy.model.parameters() if p.requires_grad),
              "tokens_per_step": float(batch["attention_mask"].sum()), "padded_tokens_per_step": batch["attention_mask"].numel(),
              "step_seconds": seconds, "losses": losses}
    result["peak_above_start_mib"] = result["peak_rss_mib"] - start_mib
    if cuda:
        result["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def bench_memory(args) -> dict:
    """Peak memory of a few DPO steps per memory saver, each in a fresh process (one at a time), and
    each peak's ratio to the baseline's. CPU: peak RSS of the process (the whole process, and the part
    above its RSS before the model was loaded); CUDA: torch.cuda.max_memory_allocated."""
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in MEMORY_SETTINGS]
    if unknown:
        raise SystemExit(f"unknown memory setting(s) {unknown}; choose from {sorted(MEMORY_SETTINGS)}")
    cuda = torch.cuda.is_available()
    if not cuda and "offload_optimizer" in settings:
        settings.remove("offload_optimizer")  # a no-op without an accelerator: nothing to measure
    if "baseline" not in settings:
        settings.insert(0, "baseline")
    passthrough = ["--model", args.model, "--pairs", str(args.pairs), "--seq-len", str(args.seq_len),
                   "--prompt-len", str(args.prompt_len), "--micro-pairs", str(args.micro_pairs),
                   "--steps", str(args.steps), "--min-len-frac", str(args.min_len_frac)]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    results = []
    for setting in settings:
        proc = subprocess.run([sys.executable, "-m", "jobs.bench", "memory", "--child", setting, *passthrough],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory setting {setting!r} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"[memory] {setting:24s} peak RSS {r['peak_rss_mib']:8.0f} MiB (above start {r['peak_above_start_mib']:7.0f})"
              + (f", CUDA {r['peak_cuda_allocated_mib']:.0f} MiB" if cuda else "")
              + f", {sum(r['step_seconds']) / len(r['step_seconds']):.1f} s/step", file=sys.stderr, flush=True)
    key = "peak_cuda_allocated_mib" if cuda else "peak_rss_mib"
    base = results[0]
    for r in results:
        r["ratio_to_baseline"] = r[key] / base[key]
        r["ratio_above_start_to_baseline"] = r["peak_above_start_mib"] / base["peak_above_start_mib"]
    table = [f"{r['setting']:24s} {r[key]:8.0f} MiB  x{r['ratio_to_baseline']:.2f}  "
             f"(above start {r['peak_above_start_mib']:7.0f} MiB  x{r['ratio_above_start_to_baseline']:.2f})"
             for r in results]
    print("\n".join(table), file=sys.stderr)
    return {"benchmark": "memory", "model": args.model, "pairs": args.pairs, "seq_len": args.seq_len,
            "prompt_len": args.prompt_len, "min_len_frac": args.min_len_frac, "micro_pairs": args.micro_pairs,
            "steps": args.steps, "metric": key, "settings": results,
            "ratios": {r["setting"]: r["ratio_to_baseline"] for r in results},
            "ratios_above_start": {r["setting"]: r["ratio_above_start_to_baseline"] for r in results},
            "machine": machine_facts()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    gen = sub.add_parser("generate", help="generation tokens/s and weight-sync seconds through Ray actors (HF / vLLM)")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--backend", default="hf", help="hf | vllm | auto, or a comma list (hf,vllm) for the ratio")
    gen.add_argument("--num-generators", default="1", help="generators, or a comma list (1,2) for scale-out")
    gen.add_argument("--prompts", type=int, default=64)
    gen.add_argument("--new-tokens", type=int, default=48)
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--threads", type=int, default=None, help="threads per generator (default: cores / generators)")
    gen.add_argument("--repeats", type=int, default=2)
    gen.add_argument("--pin-cores", action="store_true",
                     help="confine generator i to its own cores (a fair 'one thread each' scale-out comparison)")
    gen.add_argument("--sync-repeats", type=int, default=3)
    gen.add_argument("--max-model-len", type=int, default=256, help="vLLM only")
    gen.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM on CPU only")
    dpo = sub.add_parser("dpo", help="DPO step tokens/s through a Ray actor vs in-process, and fraction of peak")
    dpo.add_argument("--model", default="smollm2")
    dpo.add_argument("--sequences", type=int, default=8, help="sequences per step (chosen + rejected)")
    dpo.add_argument("--seq-len", type=int, default=256)
    dpo.add_argument("--prompt-len", type=int, default=64)
    dpo.add_argument("--micro-pairs", type=int, default=4)
    dpo.add_argument("--bf16", action="store_true")
    dpo.add_argument("--threads", type=int, default=None)
    dpo.add_argument("--repeats", type=int, default=2, help="timed steps after the first (warm-up) step")
    dpo.add_argument("--peer", choices=["trl"], default=None,
                     help="run TRL's DPOTrainer on the same pairs, precision and threads, then this project's step")
    dpo.add_argument("--pairs", type=int, default=8, help="--peer only: preference pairs per optimizer step")
    dpo.add_argument("--beta", type=float, default=0.1, help="--peer only: DPO beta (sigmoid loss)")
    add_ppo_parser(sub)
    add_sync_parser(sub)
    mem = sub.add_parser("memory", help="peak memory of DPO steps with each memory saver (a fresh process each)")
    mem.add_argument("--model", default="smollm2")
    mem.add_argument("--settings", default="baseline,gradient_checkpointing,bf16_autocast,packing,lora,offload_optimizer,all",
                     help=f"comma list from {sorted(MEMORY_SETTINGS)} (offload_optimizer: CUDA only)")
    mem.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x sequences)")
    mem.add_argument("--seq-len", type=int, default=256, help="longest sequence (prompt + response)")
    mem.add_argument("--prompt-len", type=int, default=64)
    mem.add_argument("--min-len-frac", type=float, default=0.25, help="shortest response as a fraction of the longest")
    mem.add_argument("--micro-pairs", type=int, default=4)
    mem.add_argument("--steps", type=int, default=2, help="optimizer steps (AdamW state exists from the first)")
    mem.add_argument("--threads", type=int, default=None)
    mem.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for p in (gen, dpo, sub.choices["ppo"], sub.choices["sync"], mem):
        p.add_argument("--address", default=None)
        p.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.which == "memory" and args.child:
        print(json.dumps(_memory_child(args)))
        return 0
    result = {"generate": bench_generate, "dpo": bench_dpo, "ppo": bench_ppo, "sync": bench_sync,
              "memory": bench_memory}[args.which](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from jobs.run.cli import guarded  # user errors as one line, like every driver

    raise SystemExit(guarded(main))
