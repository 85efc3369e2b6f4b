"""``python -m jobs.bench sync``: one weight push as PPO makes it (policy -> object store -> generator), the state
dict sent as plain torch tensors (how it crossed before ``actors.weight_transfer``) and as a ``WeightDict``,
alternating, in one run.

Each push is timed from the driver: the sender's copy of the weights, Ray's serialization into the object
store, the generator's read and its in-place reload (``update_weights``, which reports its own seconds, so
``transfer_s`` = wall - reload is what the format decides).
"""

from __future__ import annotations

import statistics
import time

import ray


def add_parser(sub) -> None:
    p = sub.add_parser("sync", help="one policy -> generator weight push: plain torch tensors vs WeightDict")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--backend", default="auto", help="the generator's backend: hf | vllm | auto")
    p.add_argument("--rounds", type=int, default=3, help="pushes of each format, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each actor")
    p.add_argument("--max-model-len", type=int, default=128, help="vLLM only")
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="vLLM on CPU only")


@ray.remote
class _WeightsHolder:
    """A model whose weights leave the actor in either format (the policy's ``named_weights`` is the new one)."""

    def __init__(self, model: str, threads: int):
        from actors.models import load_causal_lm, resolve_model_path
        from actors.runtime import configure_threads

        configure_threads(threads)
        self.model = load_causal_lm(resolve_model_path(model))

    def weights(self, kind: str):
        from actors.models import merged_state_dict

        if kind == "torch_pickle":  # what named_weights returned before: a plain dict, one clone per name
            return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        return merged_state_dict(self.model)


def bench_sync(args) -> dict:
    from actors.generation import GenerationActor, resolve_backend
    from actors.group import ActorGroup, ActorResources
    from jobs.run.cluster import init_ray

    init_ray(args.address)
    backend = resolve_backend(args.backend)
    options = {"max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib} if backend == "vllm" else None
    generator = ActorGroup(GenerationActor, "bench-sync-generator", resources=ActorResources(torch_threads=args.threads),
                           init_kwargs={"model": args.model, "backend": backend, "backend_options": options})
    holder = _WeightsHolder.remote(args.model, args.threads)
    kinds = ("torch_pickle", "weight_dict")
    runs = {kind: [] for kind in kinds}
    try:
        info = generator.wait_ready()[0]
        ray.get(holder.__ray_ready__.remote())
        for version in range(args.rounds):
            for kind in (kinds if version % 2 == 0 else kinds[::-1]):
                start = time.perf_counter()
                (result,) = generator.run_all("update_weights", holder.weights.remote(kind), version)
                wall = time.perf_counter() - start
                runs[kind].append({"wall_s": wall, "reload_s": result["seconds"], "transfer_s": wall - result["seconds"]})
    finally:
        ray.kill(holder)
        generator.shutdown()
    median = {kind: {key: statistics.median(r[key] for r in rows) for key in ("wall_s", "reload_s", "transfer_s")}
              for kind, rows in runs.items()}
    return {"benchmark": "sync", "model": args.model, "backend": backend, "weight_sync_path": info.get("weight_sync"),
            "rounds": args.rounds, "threads": args.threads, "runs": runs, "median": median,
            "speedup_wall": median["torch_pickle"]["wall_s"] / median["weight_dict"]["wall_s"],
            "speedup_transfer": median["torch_pickle"]["transfer_s"] / median["weight_dict"]["transfer_s"]}
