"""Supervised fine-tuning on response tokens only: the SFT starting policy and the Preferred-FT baseline.

    python -m jobs.sft --preset sft_tiny [key.sub=value ...]

``target`` picks the demonstrations:
- ``chosen``: the preferred reply of each preference pair (Preferred-FT in the DPO paper);
- ``continuation``: the rest of each IMDb review after its prompt prefix (the paper's SFT policy).
The loss is the mean NLL of response tokens; prompt tokens are masked out.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actors.math.batch import collate_sequences
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.optim import OptimizerConfig
from actors.policy import PolicyActor
from jobs.run.batching import TokenizeConfig, encode_prompt, encode_response, fit_lengths
from jobs.run.cluster import TrainingRoleConfig, build_training_group, init_ray
from jobs.run.config import ConfigError, check_model, run_cli, save_config
from jobs.data.source import DataConfig, load_pair_splits, load_prompt_splits
from jobs.run.faults import NonFiniteGuard
from jobs.run.metrics import MetricsLogger
from jobs.run.sampler import ShuffledBatches, check_step_plan, plan_steps, supervised_steps

TARGETS = ("chosen", "continuation")


@dataclass
class SFTConfig:
    run_name: str = "sft"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"
    data: DataConfig = field(default_factory=DataConfig)
    target: str = "chosen"
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, warmup_steps=10))
    batch_size: int = 16          # sequences per optimizer step
    micro_batch_size: int = 8     # sequences per forward pass
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int = 50          # steps; 0 = only at the start and the end
    autocast_bf16: bool = False
    torch_threads: int | None = None
    address: str | None = None
    policy: TrainingRoleConfig = field(default_factory=TrainingRoleConfig)  # FSDP2 group, LoRA, memory savers

    def validate(self) -> None:
        self.policy.validate("policy")
        self.data.validate()
        self.tokenize.validate()
        self.optimizer.validate()
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        check_step_plan(self)
        check_model("model", self.model)


@dataclass
class Demonstration:
    prompt_ids: list[int]
    response_ids: list[int]


def load_demonstrations(config: SFTConfig, tokenizer) -> tuple[list[Demonstration], list[Demonstration], dict]:
    """(train, eval) prompt/response token ids for ``config.target``, with the loader's report."""
    if config.target == "chosen":
        train, evals, report = load_pair_splits(config.data, config.seed)
        texts = lambda records: [(r.prompt, r.chosen, r.source) for r in records]
    else:
        train, evals, report = load_prompt_splits(config.data, config.seed)
        missing = [r.source for r in train if "continuation" not in r.metadata]
        if missing:
            raise ConfigError(f"target=continuation needs an IMDb-style prompt source (imdb:...); "
                              f"{missing[0]} has no continuation")
        texts = lambda records: [(r.prompt, r.metadata["continuation"], r.source) for r in records]

    def encode(records):
        out = []
        for prompt, response, source in texts(records):
            if not response.strip():
                continue  # an IMDb review no longer than its prefix: nothing to learn from
            fitted = fit_lengths(encode_prompt(tokenizer, prompt, config.tokenize),
                                 [encode_response(tokenizer, response)], config.tokenize, source)
            if fitted is not None:
                out.append(Demonstration(fitted[0], fitted[1][0]))
        return out

    return encode(train), encode(evals), report


def _batch(demos: list[Demonstration], pad_id: int):
    return collate_sequences([d.prompt_ids for d in demos], [d.response_ids for d in demos], pad_id)


def evaluate(policy: ActorGroup, demos: list[Demonstration], pad_id: int, micro: int, chunk: int = 64) -> dict:
    nll, tokens = 0.0, 0.0
    for start in range(0, len(demos), chunk):
        part = policy.run_one("eval_sft", _batch(demos[start:start + chunk], pad_id), micro)
        nll, tokens = nll + part["nll_sum"], tokens + part["response_tokens"]
    mean = nll / max(tokens, 1.0)
    return {"eval/nll": mean, "eval/perplexity": float(np.exp(min(mean, 50.0)))}


def train(config: SFTConfig) -> dict:
    out = Path(config.output_dir) / config.run_name
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id
    train_demos, eval_demos, report = load_demonstrations(config, tokenizer)
    if not train_demos:
        raise ConfigError(f"data.train: no usable demonstrations in {config.data.train!r}")
    print(f"[data] {len(train_demos)} train / {len(eval_demos)} eval demonstrations ({config.target}); "
          f"{json.dumps(report)}")

    save_config(config, out)  # the first write, once config and data are checked: a failed start writes nothing
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    policy = build_training_group(PolicyActor, "policy", config.policy,
                                  resources=ActorResources(torch_threads=config.torch_threads), call_timeout_s=1800.0,
                                  init_kwargs={"model": config.model, "optimizer": dataclasses.asdict(config.optimizer),
                                               "seed": config.seed, "autocast_bf16": config.autocast_bf16,
                                               "micro_batch_size": config.micro_batch_size})
    policy.wait_ready()
    steps_per_epoch, total_steps = plan_steps(len(train_demos), config.batch_size, config.epochs, config.max_steps)
    logger = MetricsLogger(out)
    first_eval = evaluate(policy, eval_demos, pad_id, config.micro_batch_size) if eval_demos else {}
    logger.log(0, first_eval)
    batches = ShuffledBatches(len(train_demos), config.batch_size, config.seed)
    start_all = time.perf_counter()
    loop = supervised_steps(
        desc=f"sft[{config.target}]", total_steps=total_steps, steps_per_epoch=steps_per_epoch, batches=batches,
        train_step=lambda index, _step: policy.run_one("train_sft", _batch([train_demos[i] for i in index], pad_id),
                                                config.micro_batch_size),
        evaluate=(lambda: evaluate(policy, eval_demos, pad_id, config.micro_batch_size)) if eval_demos else None,
        eval_every=config.eval_every, logger=logger, guard=NonFiniteGuard(),
        postfix={"loss": ("loss", ".4f"), "tok_s": ("perf/tokens_per_s", ".0f")})
    tokens_trained, last_eval = loop.tokens, loop.last_eval or first_eval
    logger.close()
    checkpoint = out / "checkpoint"
    policy.run_one("save", str(checkpoint))
    save_config(config, checkpoint)
    policy.shutdown()
    summary = {"steps": total_steps, "train_examples": len(train_demos), "eval_examples": len(eval_demos),
               "tokens_trained": tokens_trained, "wall_s": time.perf_counter() - start_all,
               "checkpoint": str(checkpoint), "start": first_eval, "end": last_eval}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[eval] start {json.dumps(first_eval)}\n[eval] end   {json.dumps(last_eval)}")
    print(f"[done] {total_steps} steps; checkpoint {checkpoint}")
    return summary


def main(argv=None) -> int:
    return run_cli(SFTConfig, train, "python -m jobs.sft", __doc__, argv, "key.sub=value overrides, e.g. optimizer.lr=2e-5")


if __name__ == "__main__":
    raise SystemExit(main())
