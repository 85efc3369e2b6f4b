"""The head-to-head experiment: RLHF (PPO) vs DPO and baselines on the same data, and its report.

    python -m jobs.compare --preset demo [key.sub=value ...]

The DPO paper's controlled-sentiment study: SFT policy -> review-opening prompts -> samples from the
SFT policy, every pair labelled by the gold scorer -> reward model -> PPO (learned reward, several KL
coefficients) and PPO-GT (gold reward) -> DPO (several β) -> Preferred-FT -> Best-of-N -> evaluation
of every policy on held-out prompts -> an HTML report with tables. Each stage is a job cached under
``stages/<name>-<hash of its config>``; a rerun skips every finished stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from actors.group import COMPUTE_LEDGER, ActorGroup
from actors.models import load_tokenizer
from jobs.run.cluster import init_ray
from jobs.run.config import ConfigError, build_config, config_hash, run_cli, save_config
from jobs.data.source import DataConfig, load_prompt_splits
from jobs.experiment.evaluate import EvalConfig, evaluate_policy, gold_judge, policy_seed, summarize
from jobs.experiment.preference_data import PreferenceDataConfig, build_preference_data


@dataclass
class CompareConfig:
    run_name: str = "compare"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"                 # the pretrained model SFT starts from
    gold_scorer: str = "vader"             # the gold reward: labels preferences, judges every policy
    prompts: DataConfig = field(default_factory=lambda: DataConfig(train="demo", eval_fraction=0.2))
    # Each stage's section holds overrides for that job's config (see jobs/presets/*.yaml for keys).
    sft: dict[str, Any] | None = None      # None: ``model`` is already the SFT policy (no SFT stage)
    preference: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    reward: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
    ppo_kl_coefs: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.2])
    ppo_gold: bool = True                  # also PPO-GT: PPO on the gold reward
    dpo: dict[str, Any] = field(default_factory=dict)
    dpo_betas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.5])
    preferred_ft: dict[str, Any] | None = field(default_factory=dict)  # None: skip Preferred-FT
    best_of_n: dict[str, Any] | None = field(default_factory=dict)     # None: skip Best-of-N
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation_backend: str = "auto"       # hf | vllm | auto (vLLM where installed and able to host the model)
    torch_threads: int | None = None
    address: str | None = None

    def validate(self) -> None:
        self.prompts.validate()
        self.preference.validate()
        self.eval.validate()
        if not self.ppo_kl_coefs and not self.dpo_betas:
            raise ConfigError("ppo_kl_coefs and dpo_betas are both empty: nothing to compare")
        if any(c < 0 for c in self.ppo_kl_coefs):
            raise ConfigError(f"ppo_kl_coefs must be >= 0, got {self.ppo_kl_coefs}")
        if any(b <= 0 for b in self.dpo_betas):
            raise ConfigError(f"dpo_betas must be > 0, got {self.dpo_betas}")
        if self.prompts.eval_fraction <= 0 and not self.prompts.eval:
            raise ConfigError("prompts.eval_fraction must be > 0 (or prompts.eval set): evaluation needs held-out prompts")
        check_stage_sections(self)


def check_stage_sections(config: CompareConfig) -> None:
    """Build every stage's section against its job's dataclass now, so a bad key or type anywhere in a
    preset (``dpo.betaa``) fails before any actor starts, not after the stages before it have run.
    Keys and types only: a job's own validate() needs paths (pairs, checkpoints) that earlier stages write."""
    from jobs.drivers.best_of_n import BestOfNConfig
    from jobs.drivers.dpo import DPOConfig
    from jobs.drivers.ppo import PPOConfig
    from jobs.drivers.reward import RewardTrainConfig
    from jobs.drivers.sft import SFTConfig
    from jobs.run.config import _build

    sections = {"sft": (SFTConfig, config.sft), "reward": (RewardTrainConfig, config.reward),
                "ppo": (PPOConfig, config.ppo), "dpo": (DPOConfig, config.dpo),
                "preferred_ft": (SFTConfig, config.preferred_ft), "best_of_n": (BestOfNConfig, config.best_of_n)}
    for section, (cls, values) in sections.items():
        if values:
            _build(cls, values, section)


# -- stages -----------------------------------------------------------------------------------------
@dataclass
class StageResult:
    name: str
    folder: Path
    summary: dict
    compute: dict          # wall_s, cpu_s (driver + actors), device_s
    skipped: bool


class StageRunner:
    """Runs a stage once per config: ``stages/<name>-<hash>/stage.json`` marks it finished."""

    def __init__(self, root: Path):
        self.root = root / "stages"
        self.results: dict[str, StageResult] = {}

    def run(self, name: str, key: Any, fn: Callable[[Path], dict]) -> StageResult:
        folder = self.root / f"{name}-{config_hash(key)}"
        marker = folder / "stage.json"
        if marker.exists():
            record = json.loads(marker.read_text())
            result = StageResult(name, folder, record["summary"], record["compute"], True)
            print(f"[stage] {name}: finished earlier, skipped ({folder.name})")
        else:
            print(f"[stage] {name}: running ({folder.name})")
            folder.mkdir(parents=True, exist_ok=True)
            before, cpu0, t0 = dict(COMPUTE_LEDGER.snapshot()), time.process_time(), time.perf_counter()
            summary = fn(folder)
            after = COMPUTE_LEDGER.snapshot()
            compute = {"wall_s": time.perf_counter() - t0,
                       "cpu_s": time.process_time() - cpu0 + after["cpu_s"] - before["cpu_s"],
                       "device_s": after["device_s"] - before["device_s"]}
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"name": name, "summary": summary, "compute": compute}, indent=2, default=float))
            tmp.rename(marker)  # atomic: a stage interrupted mid-way is rerun, never half-trusted
            result = StageResult(name, folder, summary, compute, False)
            print(f"[stage] {name}: done in {compute['wall_s']:.0f} s")
        self.results[name] = result
        return result


def _job_config(cls, base: dict, overrides: dict | None):
    """A job's config from the comparison's choices (``base``) and the preset's section (``overrides``)."""
    merged = _deep_merge(dict(overrides or {}), base)
    return build_config(cls, None, [f"{k}={json.dumps(v)}" for k, v in _flatten(merged).items()])


def _deep_merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for key, value in high.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key not in ("columns",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _run_job(runner: StageRunner, name: str, cls, base: dict, overrides: dict | None, train: Callable) -> StageResult:
    """A job (sft / reward / ppo / dpo) as a stage: its config hash names the folder it writes into."""
    config = _job_config(cls, {**base, "run_name": name, "output_dir": ""}, overrides)

    def go(folder: Path) -> dict:
        return train(dataclasses.replace(config, output_dir=str(folder.parent), run_name=folder.name))

    return runner.run(name, config, go)


# -- the experiment -------------------------------------------------------------------------------
def run_experiment(config: CompareConfig) -> dict:
    from jobs.drivers.dpo import DPOConfig
    from jobs.drivers.dpo import train as train_dpo
    from jobs.drivers.ppo import PPOConfig
    from jobs.drivers.ppo import train as train_ppo
    from jobs.drivers.reward import RewardTrainConfig
    from jobs.drivers.reward import train as train_reward
    from jobs.drivers.sft import SFTConfig
    from jobs.drivers.sft import train as train_sft

    root = Path(config.output_dir) / config.run_name
    save_config(config, root)
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    runner = StageRunner(root)
    common = {"seed": config.seed, "torch_threads": config.torch_threads}
    policies: dict[str, dict] = {}  # run -> {method, param, checkpoint, stages}

    # 1. The SFT policy (or the given model when it already is one).
    sft_stages: list[str] = []
    if config.sft is not None:
        sft = _run_job(runner, "sft", SFTConfig, {"model": config.model, **common}, config.sft, train_sft)
        sft_policy, sft_stages = sft.summary["checkpoint"], ["sft"]
    else:
        sft_policy = config.model
    policies["SFT"] = {"method": "SFT", "param": None, "checkpoint": sft_policy, "stages": sft_stages}

    # 2. Prompts: train prompts feed preference sampling and PPO; held-out prompts feed evaluation.
    train_prompts, eval_prompts, report = load_prompt_splits(config.prompts, config.seed)
    prompt_texts = [p.prompt for p in train_prompts]
    if any(not isinstance(p, str) for p in prompt_texts):
        raise ConfigError("prompts: jobs.compare needs plain-text prompts (review openings), not chat messages")
    print(f"[prompts] {len(train_prompts)} train / {len(eval_prompts)} held-out; {json.dumps(report)}")

    # 3. The preference dataset: SFT samples, every pair labelled by the gold scorer.
    pref_key = {"policy": sft_policy, "gold": config.gold_scorer, "prompts": dataclasses.asdict(config.prompts),
                "preference": dataclasses.asdict(config.preference), "seed": config.seed}
    pref = runner.run("preference_data", pref_key, lambda folder: build_preference_data(
        sft_policy, prompt_texts, config.gold_scorer, config.preference, folder / "pairs.jsonl", seed=config.seed,
        torch_threads=config.torch_threads, backend=config.generation_backend))
    pairs = {"train": f"jsonl:{pref.summary['path']}", "eval_fraction": 0.1}
    pref_stages = sft_stages + ["preference_data"]

    # 4. Reward model on the SFT backbone, normalised on SFT samples.
    reward = _run_job(runner, "reward", RewardTrainConfig,
                      {"model": sft_policy, "data": pairs, "normalize": {"policy": sft_policy}, **common},
                      config.reward, train_reward)
    rm_stages = pref_stages + ["reward"]

    # 5. PPO with the learned reward at each KL coefficient, and PPO-GT.
    ppo_base = {"model": sft_policy, "data": dataclasses.asdict(config.prompts), "eval_prompts": 0, "eval_every": 0,
                "eval_scorer": None,  # evaluation happens once, below, for every method alike
                "generation_backend": config.generation_backend, **common}
    for coef in config.ppo_kl_coefs:
        name = f"ppo-kl{coef:g}"
        result = _run_job(runner, name, PPOConfig, {**ppo_base, "kl": {"coef": coef},
                                                     "reward": {"kind": "learned", "model": reward.summary["checkpoint"]}},
                          config.ppo, train_ppo)
        policies[name] = {"method": "PPO", "param": coef, "checkpoint": result.summary["checkpoint"],
                          "stages": rm_stages + [name]}
    if config.ppo_gold:
        coef = sorted(config.ppo_kl_coefs)[len(config.ppo_kl_coefs) // 2] if config.ppo_kl_coefs else 0.05
        name = f"ppo-gt-kl{coef:g}"
        result = _run_job(runner, name, PPOConfig, {**ppo_base, "kl": {"coef": coef},
                                                     "reward": {"kind": "gold", "scorer": config.gold_scorer}},
                          config.ppo, train_ppo)
        policies[name] = {"method": "PPO-GT", "param": coef, "checkpoint": result.summary["checkpoint"],
                          "stages": sft_stages + [name]}

    # 6. DPO at each β, on the same pairs.
    for beta in config.dpo_betas:
        name = f"dpo-beta{beta:g}"
        result = _run_job(runner, name, DPOConfig, {"model": sft_policy, "data": pairs, "loss": {"beta": beta}, **common},
                          config.dpo, train_dpo)
        policies[name] = {"method": "DPO", "param": beta, "checkpoint": result.summary["checkpoint"],
                          "stages": pref_stages + [name]}

    # 7. Preferred-FT: SFT on the chosen replies.
    if config.preferred_ft is not None:
        result = _run_job(runner, "preferred-ft", SFTConfig, {"model": sft_policy, "data": pairs, "target": "chosen",
                                                              **common}, config.preferred_ft, train_sft)
        policies["preferred-ft"] = {"method": "Preferred-FT", "param": None, "checkpoint": result.summary["checkpoint"],
                                    "stages": pref_stages + ["preferred-ft"]}

    # 8. Evaluation of every policy on the held-out prompts (the SFT policy is the win-rate baseline).
    tokenizer = load_tokenizer(sft_policy)
    eval_ids = [tokenizer(p.prompt, add_special_tokens=True)["input_ids"] for p in eval_prompts][: config.eval.num_prompts]
    evaluations: dict[str, pd.DataFrame] = {}
    shared: dict[str, ActorGroup] = {}  # the judge, started on first need

    def shared_actors() -> dict[str, ActorGroup]:
        if not shared:
            shared["judge"] = gold_judge(config.gold_scorer, sft_policy)
        return shared

    for run, info in policies.items():
        key = {"policy": info["checkpoint"], "reference": sft_policy, "eval": dataclasses.asdict(config.eval),
               "prompts": eval_ids, "gold": config.gold_scorer, "seed": policy_seed(config.seed, run)}

        def go(folder: Path, info=info, run=run) -> dict:
            actors = shared_actors()
            samples = evaluate_policy(info["checkpoint"], eval_ids, config.eval, judge=actors["judge"],
                                      reference=sft_policy, seed=policy_seed(config.seed, run),
                                      torch_threads=config.torch_threads, backend=config.generation_backend)
            samples.to_parquet(folder / "samples.parquet")
            return {"samples_path": str(folder / "samples.parquet"), **summarize(samples, config.eval, config.seed)}

        result = runner.run(f"eval-{run}", key, go)
        evaluations[run] = pd.read_parquet(result.summary["samples_path"])
    for group in shared.values():
        group.shutdown()

    # 9. Best-of-N with the learned reward (its own sampling; KL is analytic).
    best_of_n_rows = _best_of_n_stage(runner, config, sft_policy, reward.summary["checkpoint"], eval_ids, rm_stages)

    from jobs.experiment.report import write_report

    report_path = write_report(root, config, policies, evaluations, runner.results, best_of_n_rows)
    examples = pd.read_csv(root / "tables" / "examples.csv", keep_default_na=False)
    for _, row in examples.groupby("run").head(1).iterrows():
        print(f"[sample] {row['run']:>14}: {row['prompt']!r} -> {row['continuation']!r} (gold {row['gold']:+.3f})")
    print((root / "summary.txt").read_text().rstrip())
    print(f"[report] {report_path}")
    return {"report": str(report_path), "stages": {k: v.skipped for k, v in runner.results.items()}}


def _best_of_n_stage(runner: StageRunner, config: CompareConfig, sft_policy: str, reward_model: str,
                     eval_ids: list[list[int]], stages: list[str]) -> pd.DataFrame | None:
    if config.best_of_n is None:
        return None
    from jobs.drivers.best_of_n import BestOfNConfig
    from jobs.drivers.best_of_n import train as run_best_of_n

    base = {"model": sft_policy, "reward": {"kind": "learned", "model": reward_model}, "gold_scorer": config.gold_scorer,
            "data": dataclasses.asdict(config.prompts), "split": "eval", "num_prompts": config.eval.num_prompts,
            "max_new_tokens": config.eval.max_new_tokens,
            "seed": config.seed, "torch_threads": config.torch_threads, "backend": config.generation_backend}
    result = _run_job(runner, "best-of-n", BestOfNConfig, base, config.best_of_n, run_best_of_n)
    table = pd.read_csv(result.summary["csv"])
    table["stages"] = [stages + ["best-of-n"]] * len(table)
    return table


def main(argv=None) -> int:
    return run_cli(CompareConfig, run_experiment, "python -m jobs.compare", __doc__, argv,
                   "key.sub=value overrides, e.g. dpo_betas=[0.1,0.5]",
                   same_config_continues=True)  # a rerun of the same config continues (finished stages skipped)


if __name__ == "__main__":
    raise SystemExit(main())
