"""``python -m jobs.bench ppo``: PPO steps on SmolLM2 through the real driver, each phase's time and share.

The driver's own per-step timings are read back from its metrics file, so what is measured is what
``jobs.ppo`` does. Phases that run concurrently (the four scoring passes; the policy and critic
updates) are reported both per actor and as the wall time of the phase; the shares use wall times
and sum to 1 with ``other`` (driver bookkeeping, object-store transfers).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

WALL_PHASES = ("generate", "score", "advantages", "update", "sync_weights")
ACTOR_PHASES = ("old_logprobs", "ref", "reward", "values", "update_actor", "update_critic")


def add_parser(sub) -> None:
    p = sub.add_parser("ppo", help="one PPO step's phase times and shares (SmolLM2 by default)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="the first is a warm-up; the last is reported")
    p.add_argument("--backend", default="auto", help="generation backend: hf | vllm | auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: all cores)")


def bench_ppo(args) -> dict:
    from jobs.run.config import build_config
    from jobs.drivers.ppo import PPOConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", "run_name=bench_ppo", f"model={args.model}", "data.train=demo",
                     f"prompts_per_step={args.prompts}", f"steps={args.steps}", f"rollout.max_new_tokens={args.new_tokens}",
                     "rollout.temperature=1.0", "eval_prompts=0", "eval_every=0",
                     f"ppo.epochs={args.epochs}", f"ppo.minibatch_size={args.minibatch}",
                     f"ppo.micro_batch_size={args.minibatch}", f"generation_backend={args.backend}",
                     "reward.kind=gold", "reward.scorer=vader", "optimizer.lr=1e-6"]
        if args.threads:
            overrides.append(f"torch_threads={args.threads}")
        if args.address:
            overrides.append(f"address={args.address}")
        config = build_config(PPOConfig, None, overrides)
        train(config)
        rows = [json.loads(line) for line in (Path(tmp) / "bench_ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    last = steps[-1]
    step_s = last["timing_s/step"]
    wall = {p: last[f"timing_s/{p}"] for p in WALL_PHASES}
    wall["other"] = max(0.0, step_s - sum(wall.values()))
    return {"benchmark": "ppo", "model": args.model, "prompts": args.prompts, "max_new_tokens": args.new_tokens,
            "ppo_epochs": args.epochs, "minibatch": args.minibatch, "backend": args.backend,
            "step_s": step_s, "phase_s": wall, "phase_share": {p: s / step_s for p, s in wall.items()},
            "actor_s": {p: last[f"timing_s/{p}"] for p in ACTOR_PHASES},
            "tokens_generated": last["response_length/mean"] * args.prompts,
            "generate_tokens_per_s": last["response_length/mean"] * args.prompts / wall["generate"],
            "all_steps_s": [r["timing_s/step"] for r in steps]}
