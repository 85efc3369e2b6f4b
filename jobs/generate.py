"""Sample completions from Ray generation actors and print them with log-probs (and rewards).

    python -m jobs.generate --model smollm2 --prompt "This movie was" --n 4 --score vader
"""

from __future__ import annotations

import argparse
import sys
import time

from actors.generation import GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.reward import RewardModelActor
from jobs.run.batching import TokenizeConfig, encode_prompt
from jobs.run.cluster import init_ray


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | HF id | local folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--num-generators", type=int, default=1)
    p.add_argument("--threads-per-generator", type=int, default=None,
                   help="torch threads per generation actor (default: cores / generators)")
    p.add_argument("--backend", default="auto", choices=["hf", "vllm", "auto"], help="auto: vLLM where installed")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--score", default=None, help="gold scorer spec, e.g. vader")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import os

    args = parse_args(argv)
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    sampling.validate()
    if args.num_generators < 1:
        sys.exit("--num-generators must be >= 1")
    init_ray(args.address)
    tokenizer = load_tokenizer(args.model)
    config = TokenizeConfig(chat_template="always" if args.chat else "never")
    prompt_ids = [encode_prompt(tokenizer, p, config) for p in args.prompt]

    threads = args.threads_per_generator or max(1, (os.cpu_count() or 1) // args.num_generators)
    generators = ActorGroup(GenerationActor, "generator", num_actors=args.num_generators, indexed_names=True,
                            resources=ActorResources(torch_threads=threads),
                            init_kwargs={"model": args.model, "backend": args.backend, "seed": args.seed})
    reward = None
    if args.score:
        reward = ActorGroup(RewardModelActor, "reward", resources=ActorResources(num_cpus=0.5, torch_threads=1),
                            init_kwargs={"kind": "gold", "scorer": args.score, "tokenizer": args.model})
    for info in generators.wait_ready():
        print(f"[ready] {info['role']} pid={info['pid']} backend={info['backend']} threads={info['torch_threads']}")

    start = time.perf_counter()
    completions = generate_sharded(generators, prompt_ids, sampling)
    seconds = time.perf_counter() - start
    scores = None
    if reward is not None:
        scores = reward.run_one("score", [c.prompt_ids for c in completions],
                                [c.response_ids for c in completions])["scores"].tolist()

    for k, c in enumerate(completions):
        text = tokenizer.decode(c.response_ids, skip_special_tokens=True)
        line = f"[{c.prompt_index}.{c.sample_index}] logprob={sum(c.logprobs):8.2f} tokens={len(c.response_ids):3d} ({c.finish_reason})"
        if scores is not None:
            line += f" {args.score}={scores[k]:+.3f}"
        print(line)
        print(f"    {args.prompt[c.prompt_index]!r} -> {text!r}")
    tokens = sum(len(c.response_ids) for c in completions)
    print(f"{len(completions)} completions, {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s) "
          f"on {args.num_generators} generator(s)")
    generators.shutdown()
    if reward is not None:
        reward.shutdown()
    return 0


if __name__ == "__main__":
    from jobs.run.cli import guarded  # user errors as one line, like every driver

    raise SystemExit(guarded(main))
