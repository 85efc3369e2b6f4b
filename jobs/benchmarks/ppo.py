"""``python -m jobs.bench ppo``: PPO steps on SmolLM2 through the real driver, each phase's time and share.

The driver's own per-step timings are read back from its metrics file, so what is measured is what
``jobs.ppo`` does. Phases that run concurrently (the four scoring passes; the policy and critic
updates) are reported both per actor and as the wall time of the phase; the shares use wall times
and sum to 1 with ``other`` (driver bookkeeping, object-store transfers).

``--compare`` runs today's setting and the fast setting (``--fast``: a list of levers, each a list of
config overrides) at the bench's size and at the demo's size, one after the other in one process, on
the same prompts, token budget and epochs, and reports seconds per step (median of the steps after the
first, a warm-up), each phase's share and the ratios. ``--levers`` also measures each lever alone on top
of today's setting at the demo's size, so the output says with numbers which levers pay on this machine.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

WALL_PHASES = ("generate", "score", "advantages", "update", "sync_weights")
ACTOR_PHASES = ("old_logprobs", "ref", "reward", "values", "update_actor", "update_critic")
# What the fast setting uses unless --fast says otherwise. Measured at the demo's size (README): lora +
# critic_freeze 1.46x; adding gen_threads made generation 36x slower on the shared 2-core machine.
FAST_LEVERS = ("lora", "critic_freeze")


def lever_overrides(model: str) -> dict[str, list[str]]:
    """Each lever's config overrides. None changes the PPO algorithm (same prompts, tokens, epochs, minibatches,
    clipping, KL); ``lora`` and ``critic_freeze`` change which parameters train."""
    from actors.models import resolve_model_path

    config = json.loads((Path(resolve_model_path(model)) / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    return {
        # LoRA policy: only adapters train; the adapter-disabled base is the reference (no ReferenceActor); the
        # generators get adapters only where vLLM serves LoRA, else merged full weights.
        "lora": ["policy.lora={r: 16, alpha: 32}"],
        # Critic with embeddings + the lower 4/5 of its layers frozen: backward through the top fifth only.
        "critic_freeze": [f"critic.freeze_layers={max(1, layers * 4 // 5)}"],
        # Generation runs alone in a step: 2 threads for the generator (vLLM) instead of Ray's default 1.
        "gen_threads": [f"generation_options.threads={os.cpu_count() or 1}"],
        # Padding-free micro-batches for the policy and the critic (fewer wasted padded tokens).
        "packing": ["policy.packing=true", "critic.packing=true"],
        # Policy with 2 threads: it trains concurrently with the critic, so this over-subscribes 2 cores there.
        "policy_threads": [f"policy.torch_threads={os.cpu_count() or 1}"],
        # A thread budget of every core: the scoring passes and the two updates then take the cores in turns
        # (jobs.drivers.ppo.score_rollout / update_policy_and_critic) instead of sharing them at one thread each.
        "turns": [f"torch_threads={os.cpu_count() or 1}"],
    }


def add_parser(sub) -> None:
    p = sub.add_parser("ppo", help="one PPO step's phase times and shares (SmolLM2 by default); --compare: "
                                   "today's setting vs the fast one at the bench's and the demo's size")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run; the first is a warm-up (default: 2, with --compare 3)")
    p.add_argument("--backend", default="auto", help="generation backend: hf | vllm | auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per actor (default: Ray's, 1 per actor)")
    p.add_argument("--compare", action="store_true", help="today's setting and the fast one, at both sizes")
    p.add_argument("--fast", default=",".join(FAST_LEVERS), help="--compare: the fast setting's levers (comma list)")
    p.add_argument("--levers", default="", help="--compare: also each of these levers alone at the demo's size "
                                                 "(comma list, or 'all')")
    p.add_argument("--sizes", default="demo,bench", help="--compare: the sizes to run (demo, bench or both)")
    p.add_argument("--demo-prompts", type=int, default=8)
    p.add_argument("--demo-new-tokens", type=int, default=24)
    p.add_argument("--demo-epochs", type=int, default=2)
    p.add_argument("--demo-minibatch", type=int, default=8)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def run_setting(args, size: dict, extra: list[str], name: str) -> dict:
    """``steps`` PPO steps of one setting through ``jobs.ppo``'s train(); the phases' medians over the timed steps."""
    from jobs.run.config import build_config
    from jobs.drivers.ppo import PPOConfig, train

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", f"run_name=bench_ppo_{name}", f"model={args.model}", "data.train=demo",
                     f"prompts_per_step={size['prompts']}", f"steps={args.steps}",
                     f"rollout.max_new_tokens={size['new_tokens']}", "rollout.temperature=1.0",
                     "eval_prompts=0", "eval_every=0", f"ppo.epochs={size['epochs']}",
                     f"ppo.minibatch_size={size['minibatch']}", f"ppo.micro_batch_size={size['minibatch']}",
                     f"generation_backend={args.backend}", "reward.kind=gold", "reward.scorer=vader",
                     "optimizer.lr=1e-6"]
        if args.threads:
            overrides.append(f"torch_threads={args.threads}")
        if args.address:
            overrides.append(f"address={args.address}")
        config = build_config(PPOConfig, None, overrides + list(extra))
        summary = train(config)
        rows = [json.loads(line) for line in (Path(tmp) / f"bench_ppo_{name}" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    timed = steps[1:] or steps  # the first step is a warm-up (allocations, optimizer state, engine caches)
    step_s = _median([r["timing_s/step"] for r in timed])
    wall = {p: _median([r[f"timing_s/{p}"] for r in timed]) for p in WALL_PHASES}
    wall["other"] = max(0.0, step_s - sum(wall.values()))
    tokens = _median([r["response_length/mean"] for r in timed]) * size["prompts"]
    return {"setting": name, "overrides": list(extra), **size, "step_s": step_s, "phase_s": wall,
            "phase_share": {p: s / step_s for p, s in wall.items()},
            "actor_s": {p: _median([r[f"timing_s/{p}"] for r in timed]) for p in ACTOR_PHASES},
            "tokens_generated": tokens, "generate_tokens_per_s": tokens / wall["generate"] if wall["generate"] else None,
            "all_steps_s": [r["timing_s/step"] for r in steps], "weight_sync": summary["weight_sync"],
            "roles": summary["roles"], "load_average_1m": [load_before, os.getloadavg()[0]]}


def bench_ppo(args) -> dict:
    if args.steps is None:
        args.steps = 3 if args.compare else 2
    bench_size = {"prompts": args.prompts, "new_tokens": args.new_tokens, "epochs": args.epochs,
                  "minibatch": args.minibatch}
    if not args.compare:
        r = run_setting(args, bench_size, [], "today")
        last = r  # kept under the keys the README and older runs quote
        return {"benchmark": "ppo", "model": args.model, "prompts": args.prompts, "max_new_tokens": args.new_tokens,
                "ppo_epochs": args.epochs, "minibatch": args.minibatch, "backend": args.backend,
                "steps": args.steps, "step_s": last["step_s"], "phase_s": last["phase_s"],
                "phase_share": last["phase_share"], "actor_s": last["actor_s"],
                "tokens_generated": last["tokens_generated"], "generate_tokens_per_s": last["generate_tokens_per_s"],
                "all_steps_s": last["all_steps_s"]}
    return bench_compare(args, bench_size)


def bench_compare(args, bench_size: dict) -> dict:
    levers = lever_overrides(args.model)
    fast = [name.strip() for name in args.fast.split(",") if name.strip()]
    alone = list(levers) if args.levers == "all" else [n.strip() for n in args.levers.split(",") if n.strip()]
    unknown = sorted(set(fast + alone) - set(levers))
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; choose from {sorted(levers)}")
    fast_overrides = [o for name in fast for o in levers[name]]
    demo_size = {"prompts": args.demo_prompts, "new_tokens": args.demo_new_tokens, "epochs": args.demo_epochs,
                 "minibatch": args.demo_minibatch}
    result = {"benchmark": "ppo_compare", "model": args.model, "backend": args.backend, "steps": args.steps,
              "timed_steps": max(1, args.steps - 1), "fast_levers": fast, "fast_overrides": fast_overrides,
              "lever_overrides": levers, "settings": {}, "levers_alone_demo_size": {}}

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a cut-off

    sizes = {"demo": ("demo_size", demo_size), "bench": ("bench_size", bench_size)}
    wanted = [n.strip() for n in args.sizes.split(",") if n.strip()]
    if not wanted or set(wanted) - set(sizes):
        raise SystemExit(f"--sizes takes a comma list of {sorted(sizes)}, got {args.sizes!r}")
    if alone and "demo" not in wanted:
        raise SystemExit("--levers are measured against today's setting at the demo's size: keep demo in --sizes")
    for size_name, size in (sizes[n] for n in wanted):
        for setting, extra in (("today", []), ("fast", fast_overrides)):
            result["settings"][f"{setting}_{size_name}"] = run_setting(args, size, extra, f"{setting}_{size_name}")
            save()
        today, quick = result["settings"][f"today_{size_name}"], result["settings"][f"fast_{size_name}"]
        result[f"speedup_{size_name}"] = today["step_s"] / quick["step_s"]
        result[f"sync_share_{size_name}"] = quick["phase_share"]["sync_weights"]
        result[f"today_sync_share_{size_name}"] = today["phase_share"]["sync_weights"]
        save()
    base = result["settings"]["today_demo_size"]
    for name in alone:
        r = run_setting(args, demo_size, levers[name], f"lever_{name}")
        r["speedup_vs_today"] = base["step_s"] / r["step_s"]
        r["pays"] = r["speedup_vs_today"] > 1.05  # more than run-to-run noise on an idle machine
        result["levers_alone_demo_size"][name] = r
        save()
    result["targets"] = {"speedup_bench_size": 2.0, "speedup_demo_size": 2.0, "sync_share_demo_size": 0.10}
    return result
