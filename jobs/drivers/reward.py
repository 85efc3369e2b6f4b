"""Bradley-Terry reward model: an LM backbone with a scalar head read at the last response token.

    python -m jobs.reward --preset reward_tiny [key.sub=value ...]

Loss −log σ(r(x, y_w) − r(x, y_l) − margin) on preference pairs; held-out preference accuracy; then
the scores of samples from the reference policy set the normalisation (mean 0, std 1), which is
saved with the model so PPO and Best-of-N read normalised rewards.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path


from actors.math.batch import collate_pairs
from actors.math.ppo_math import SCORE_POOLINGS
from actors.generation import GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.optim import OptimizerConfig
from actors.reward import RewardModelActor
from jobs.run.batching import EncodedPair, TokenizeConfig, encode_pairs
from jobs.run.cluster import TrainingRoleConfig, build_training_group, init_ray
from jobs.run.config import ConfigError, check_model, run_cli, save_config
from jobs.data.source import DataConfig, load_pair_splits
from jobs.run.faults import NonFiniteGuard
from jobs.run.metrics import MetricsLogger
from jobs.run.sampler import ShuffledBatches, check_step_plan, plan_steps, supervised_steps


@dataclass
class NormalizeConfig:
    enabled: bool = True
    policy: str | None = None      # the reference policy whose samples set the scale; default: ``model``
    num_prompts: int = 64          # training prompts sampled from
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))


@dataclass
class RewardTrainConfig:
    run_name: str = "reward"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"         # the backbone (usually the SFT policy)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, warmup_steps=10))
    margin: float = 0.0
    freeze_layers: int = 0         # embeddings + the lowest K decoder layers stay frozen (a cheaper backward)
    pooling: str = "last"          # score readout: last (the last token's output) | mean (over response tokens)
    batch_size: int = 16           # pairs per optimizer step
    micro_batch_size: int = 8      # pairs per forward pass
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int = 50
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    torch_threads: int | None = None
    address: str | None = None
    reward: TrainingRoleConfig = field(default_factory=TrainingRoleConfig)  # FSDP2 group, LoRA, memory savers

    def validate(self) -> None:
        self.reward.validate("reward")  # colocate_with: no other role here to share with
        self.data.validate()
        self.tokenize.validate()
        self.optimizer.validate()
        self.normalize.sampling.validate("normalize.sampling")
        check_step_plan(self)
        if self.pooling not in SCORE_POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(SCORE_POOLINGS)}, got {self.pooling!r}")
        if self.freeze_layers < 0:
            raise ConfigError(f"freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.normalize.num_prompts < 2:
            raise ConfigError(f"normalize.num_prompts must be >= 2 (a std needs two samples), got "
                              f"{self.normalize.num_prompts}")
        check_model("model", self.model)
        check_model("normalize.policy", self.normalize.policy)


def _batch(pairs: list[EncodedPair], pad_id: int):
    return collate_pairs([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                         [p.rejected_ids for p in pairs], pad_id)


def evaluate(reward: ActorGroup, pairs: list[EncodedPair], pad_id: int, micro: int, chunk: int = 64) -> dict:
    """Held-out preference accuracy and mean margin over all eval pairs."""
    if not pairs:
        return {}
    correct, margin = 0.0, 0.0
    for start in range(0, len(pairs), chunk):
        part = reward.run_one("eval_rm", _batch(pairs[start:start + chunk], pad_id), micro)
        correct += part["accuracy"] * part["pairs"]
        margin += part["margin"] * part["pairs"]
    return {"eval/accuracy": correct / len(pairs), "eval/margin": margin / len(pairs)}


def normalization_from_policy(reward: ActorGroup, config: RewardTrainConfig, prompts: list[list[int]]) -> dict:
    """Sample the reference policy on training prompts, score with the raw head: (mean, std) of those scores."""
    norm = config.normalize
    generators = ActorGroup(GenerationActor, "generator", resources=ActorResources(torch_threads=config.torch_threads),
                            init_kwargs={"model": norm.policy or config.model, "seed": config.seed})
    try:
        sampling = dataclasses.replace(norm.sampling, seed=config.seed + 20_000)
        completions = generate_sharded(generators, prompts[: norm.num_prompts], sampling)
    finally:
        generators.shutdown()
    reward.run_one("set_normalization", 0.0, 1.0)
    scores = reward.run_one("score", [c.prompt_ids for c in completions], [c.response_ids for c in completions])["scores"]
    mean, std = float(scores.mean()), float(scores.std())
    reward.run_one("set_normalization", mean, std)
    return {"reward_mean": mean, "reward_std": std, "samples": len(completions)}


def train(config: RewardTrainConfig) -> dict:
    out = Path(config.output_dir) / config.run_name
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id
    train_pairs, eval_pairs, report = load_pair_splits(config.data, config.seed)
    train_enc, counts = encode_pairs(tokenizer, train_pairs, config.tokenize)
    eval_enc, _ = encode_pairs(tokenizer, eval_pairs, config.tokenize)
    if not train_enc:
        raise ConfigError(f"data.train: no usable pairs in {config.data.train!r} after validation and tokenization")
    print(f"[data] {len(train_enc)} train / {len(eval_enc)} eval pairs; {json.dumps(report)}; tokenize {json.dumps(counts)}")

    save_config(config, out)  # the first write, once config and data are checked: a failed start writes nothing
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    reward = build_training_group(RewardModelActor, "reward", config.reward,
                                  resources=ActorResources(torch_threads=config.torch_threads), call_timeout_s=1800.0,
                                  init_kwargs={"kind": "learned", "model": config.model, "seed": config.seed,
                                               "micro_batch_size": config.micro_batch_size,
                                               "freeze_layers": config.freeze_layers, "pooling": config.pooling,
                                               "optimizer": dataclasses.asdict(config.optimizer)})
    try:
        reward.wait_ready()
        steps_per_epoch, total_steps = plan_steps(len(train_enc), config.batch_size, config.epochs, config.max_steps)
        logger = MetricsLogger(out)
        first_eval = evaluate(reward, eval_enc, pad_id, config.micro_batch_size)
        logger.log(0, first_eval)
        batches = ShuffledBatches(len(train_enc), config.batch_size, config.seed)
        start_all = time.perf_counter()
        loop = supervised_steps(
            desc="reward", total_steps=total_steps, steps_per_epoch=steps_per_epoch, batches=batches,
            train_step=lambda index, _step: reward.run_one("train_rm", _batch([train_enc[i] for i in index], pad_id),
                                                    config.margin, config.micro_batch_size),
            evaluate=(lambda: evaluate(reward, eval_enc, pad_id, config.micro_batch_size)) if eval_enc else None,
            eval_every=config.eval_every, logger=logger, guard=NonFiniteGuard(), postfix={"loss": ("loss", ".4f"), "acc": ("accuracy", ".2f")})
        tokens_trained, last_eval = loop.tokens, loop.last_eval or first_eval
        logger.close()

        normalization = {}
        if config.normalize.enabled:
            prompts = [list(p) for p in sorted({tuple(p.prompt_ids) for p in train_enc})]
            random.Random(config.seed).shuffle(prompts)
            normalization = normalization_from_policy(reward, config, prompts)
            print(f"[normalize] reference-policy samples: mean {normalization['reward_mean']:+.4f}, "
                  f"std {normalization['reward_std']:.4f} over {normalization['samples']} samples")
        checkpoint = out / "checkpoint"
        reward.run_one("save", str(checkpoint))
        save_config(config, checkpoint)
    finally:  # a sharded group also holds a placement group: never leave it behind
        reward.shutdown()
    summary = {"steps": total_steps, "train_pairs": len(train_enc), "eval_pairs": len(eval_enc),
               "tokens_trained": tokens_trained, "wall_s": time.perf_counter() - start_all,
               "checkpoint": str(checkpoint), "start": first_eval, "end": last_eval, "normalization": normalization}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[eval] start {json.dumps(first_eval)}\n[eval] end   {json.dumps(last_eval)}")
    print(f"[done] {total_steps} steps; reward model {checkpoint}")
    return summary


def main(argv=None) -> int:
    return run_cli(RewardTrainConfig, train, "python -m jobs.reward", __doc__, argv,
                   "key.sub=value overrides, e.g. margin=0.5")


if __name__ == "__main__":
    raise SystemExit(main())
