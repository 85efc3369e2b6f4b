"""The head-to-head experiment: RLHF (PPO), DPO, critic-free RL, online DPO and baselines on the same data.

    python -m jobs.compare --preset demo [key.sub=value ...]

The DPO paper's controlled-sentiment study: SFT policy -> review-opening prompts -> samples from the
SFT policy, every pair labelled by the gold scorer -> reward model -> the chosen ``methods``, each
over its sweep (PPO and the critic-free RL methods over KL coefficients with the learned reward,
PPO-GT with the gold reward, DPO and online DPO over β, Preferred-FT) -> Best-of-N -> evaluation of
every policy, and of every snapshot a job saved on the way (``snapshot_steps``), on held-out
prompts -> an HTML report with tables. Each stage is a job cached under
``stages/<name>-<hash of its config>``; a rerun skips every finished stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from actors.models import load_tokenizer
from jobs.data.source import DataConfig, load_prompt_splits
from jobs.drivers.best_of_n import BestOfNConfig
from jobs.drivers.best_of_n import train as run_best_of_n
from jobs.drivers.dpo import DPOConfig
from jobs.drivers.dpo import train as train_dpo
from jobs.drivers.online_dpo import OnlineDPOConfig
from jobs.drivers.online_dpo import train as train_online_dpo
from jobs.drivers.policy_gradient import PolicyGradientConfig
from jobs.drivers.policy_gradient import train as train_policy_gradient
from jobs.drivers.ppo import PPOConfig
from jobs.drivers.ppo import train as train_ppo
from jobs.drivers.reward import RewardTrainConfig
from jobs.drivers.reward import train as train_reward
from jobs.drivers.sft import SFTConfig
from jobs.drivers.sft import train as train_sft
from jobs.experiment.evaluate import EvalConfig, PolicyEvaluator, gold_judge, policy_seed, summarize
from jobs.experiment.preference_data import PreferenceDataConfig, build_preference_data
from jobs.experiment.report import write_report
from jobs.experiment.reward_diagnostics import best_of_n_differences, reward_model_diagnostics
from jobs.experiment.stages import StageResult, StageRunner, deep_merge, run_job
from jobs.run.cluster import init_ray
from jobs.run.config import ConfigError, _build, run_cli, save_config

# method key -> (label in the report, sweep key, job section, run-name prefix)
METHODS = {
    "ppo": ("PPO", "ppo_kl_coefs", "ppo", "ppo-kl"),
    "ppo_gt": ("PPO-GT", "ppo_gt_kl_coefs", "ppo", "ppo-gt-kl"),
    "dpo": ("DPO", "dpo_betas", "dpo", "dpo-beta"),
    "preferred_ft": ("Preferred-FT", None, "preferred_ft", "preferred-ft"),
    "rloo": ("RLOO", "pg_kl_coefs", "policy_gradient", "rloo-kl"),
    "grpo": ("GRPO", "pg_kl_coefs", "policy_gradient", "grpo-kl"),
    "dr_grpo": ("Dr. GRPO", "pg_kl_coefs", "policy_gradient", "dr-grpo-kl"),
    "reinforce_pp": ("REINFORCE++", "pg_kl_coefs", "policy_gradient", "reinforce-pp-kl"),
    "online_dpo": ("Online DPO", "online_dpo_betas", "online_dpo", "online-dpo-beta"),
    "online_dpo_gt": ("Online DPO-GT", "online_dpo_betas", "online_dpo", "online-dpo-gt-beta"),
    "best_of_n": ("Best-of-N", None, "best_of_n", "best-of-n"),
}
SECTION_CLASSES = {"sft": SFTConfig, "reward": RewardTrainConfig, "ppo": PPOConfig, "ppo_gt": PPOConfig,
                   "dpo": DPOConfig, "preferred_ft": SFTConfig, "policy_gradient": PolicyGradientConfig,
                   "online_dpo": OnlineDPOConfig, "best_of_n": BestOfNConfig}


@dataclass
class UsefulWorkRates:
    """The benchmark rates that turn a stage's tokens into the seconds of useful work they need
    (``useful_fraction`` in tables/stages.csv): measured on the 2-core CPU box by
    ``python -m jobs.bench dpo`` (a training step's tokens/s) and ``python -m jobs.bench generate``
    (vLLM generation tokens/s). Set them to your machine's figures."""
    train_tokens_per_s: float = 179.0
    generate_tokens_per_s: float = 749.0


@dataclass
class CompareConfig:
    run_name: str = "compare"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"                 # the pretrained model SFT starts from
    gold_scorer: str = "vader"             # the gold reward: labels preferences, judges every policy
    prompts: DataConfig = field(default_factory=lambda: DataConfig(train="demo", eval_fraction=0.2))
    methods: list[str] = field(default_factory=lambda: ["ppo", "ppo_gt", "dpo", "preferred_ft", "best_of_n"])
    # Sweeps: one run per value. KL coefficients for PPO (learned reward) and the critic-free methods
    # (rloo, grpo, dr_grpo, reinforce_pp), β for DPO and online DPO. PPO-GT: None = the middle PPO coefficient.
    ppo_kl_coefs: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.2])
    ppo_gt_kl_coefs: list[float] | None = None
    dpo_betas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.5])
    pg_kl_coefs: list[float] = field(default_factory=lambda: [0.05])
    online_dpo_betas: list[float] = field(default_factory=lambda: [0.1])
    # Each stage's section holds overrides for that job's config (see jobs/presets/*.yaml for keys);
    # ``snapshot_steps`` in a training section adds its intermediate policies to the evaluation.
    sft: dict[str, Any] | None = None      # None: ``model`` is already the SFT policy (no SFT stage)
    preference: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    reward: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
    ppo_gt: dict[str, Any] = field(default_factory=dict)  # PPO-GT's changes to `ppo` (e.g. snapshot_steps: [])
    dpo: dict[str, Any] = field(default_factory=dict)
    policy_gradient: dict[str, Any] = field(default_factory=dict)
    online_dpo: dict[str, Any] = field(default_factory=dict)
    preferred_ft: dict[str, Any] = field(default_factory=dict)
    best_of_n: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    useful_work: UsefulWorkRates = field(default_factory=UsefulWorkRates)
    generation_backend: str = "auto"       # hf | vllm | auto (vLLM where installed and able to host the model)
    torch_threads: int | None = None
    address: str | None = None

    def gt_coefs(self) -> list[float]:
        if self.ppo_gt_kl_coefs is not None:
            return self.ppo_gt_kl_coefs
        return [sorted(self.ppo_kl_coefs)[len(self.ppo_kl_coefs) // 2]] if self.ppo_kl_coefs else [0.05]

    def validate(self) -> None:
        self.prompts.validate()
        self.preference.validate()
        self.eval.validate()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods: unknown {unknown} (known: {', '.join(METHODS)})")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: repeated entries in {self.methods}")
        trained = [m for m in self.methods if m != "best_of_n"]
        if not trained:
            raise ConfigError("methods: nothing to compare (name at least one trained method)")
        for method in trained:
            sweep = METHODS[method][1]
            values = self.gt_coefs() if method == "ppo_gt" else (getattr(self, sweep) if sweep else [None])
            if not values:
                raise ConfigError(f"{sweep} is empty but methods includes {method}")
            if sweep and any(v < 0 or (v == 0 and "beta" in sweep) for v in values):
                raise ConfigError(f"{sweep} must be {'> 0' if 'beta' in sweep else '>= 0'}, got {values}")
        if self.prompts.eval_fraction <= 0 and not self.prompts.eval:
            raise ConfigError("prompts.eval_fraction must be > 0 (or prompts.eval set): evaluation needs held-out prompts")
        check_stage_sections(self)


def check_stage_sections(config: CompareConfig) -> None:
    """Build every stage's section against its job's dataclass now, so a bad key or type anywhere in a
    preset (``dpo.betaa``) fails before any actor starts, not after the stages before it have run.
    Keys and types only: a job's own validate() needs paths (pairs, checkpoints) that earlier stages write."""
    for section, cls in SECTION_CLASSES.items():
        values = getattr(config, section)
        if values:
            _build(cls, values, section)


# -- the experiment -------------------------------------------------------------------------------
def _policy_entries(name: str, label: str, param, result: StageResult, stages: list[str], steps: int | None) -> dict:
    """A trained run's final policy and every snapshot it saved, as evaluation entries. A snapshot at
    step s of S is charged s/S of its run's own compute (the stages it depends on in full)."""
    entries = {name: {"method": label, "param": param, "step": steps, "checkpoint": result.summary["checkpoint"],
                      "stages": stages, "own_fraction": 1.0}}
    for step, folder in sorted((result.summary.get("snapshots") or {}).items(), key=lambda kv: int(kv[0])):
        entries[f"{name}@{step}"] = {"method": label, "param": param, "step": int(step), "checkpoint": folder,
                                     "stages": stages, "own_fraction": int(step) / steps if steps else 1.0}
    return entries


def method_section(config: CompareConfig, method: str) -> dict:
    """The preset's section for ``method``'s runs: its job's section, with ``ppo_gt``'s changes on top for PPO-GT
    (which otherwise trains exactly as PPO does)."""
    section = getattr(config, METHODS[method][2])
    return deep_merge(section, config.ppo_gt) if method == "ppo_gt" else section


def train_methods(runner: StageRunner, config: CompareConfig, sft_policy: str, pairs: dict, reward_model: str,
                  deps: dict[str, list[str]]) -> dict[str, dict]:
    """Every trained method of ``config.methods`` over its sweep: {run name: evaluation entry}."""
    common = {"seed": config.seed, "torch_threads": config.torch_threads}
    learned = {"kind": "learned", "model": reward_model}
    gold = {"kind": "gold", "scorer": config.gold_scorer}
    rollout = {"model": sft_policy, "data": dataclasses.asdict(config.prompts), "eval_prompts": 0, "eval_every": 0,
               "eval_scorer": None,  # evaluation happens once, below, for every method alike
               "generation_backend": config.generation_backend, **common}
    policies: dict[str, dict] = {}
    for method in [m for m in METHODS if m in config.methods and m != "best_of_n"]:
        label, sweep, section, prefix = METHODS[method]
        values = config.gt_coefs() if method == "ppo_gt" else (getattr(config, sweep) if sweep else [None])
        for value in values:
            name = prefix if value is None else f"{prefix}{value:g}"
            if method in ("ppo", "ppo_gt"):
                cls, train, steps_key, stage_deps = PPOConfig, train_ppo, "steps", deps["gold" if method == "ppo_gt" else "rm"]
                base = {**rollout, "kl": {"coef": value}, "reward": gold if method == "ppo_gt" else learned}
            elif method in ("rloo", "grpo", "dr_grpo", "reinforce_pp"):
                cls, train, steps_key, stage_deps = PolicyGradientConfig, train_policy_gradient, "steps", deps["rm"]
                base = {**rollout, "advantage": method, "kl_coef": value, "reward": learned}
            elif method in ("online_dpo", "online_dpo_gt"):
                cls, train, steps_key = OnlineDPOConfig, train_online_dpo, "rounds"
                stage_deps = deps["gold" if method == "online_dpo_gt" else "rm"]
                base = {**rollout, "loss": {"beta": value}, "reward": gold if method == "online_dpo_gt" else learned}
            elif method == "dpo":
                cls, train, steps_key, stage_deps = DPOConfig, train_dpo, "max_steps", deps["pairs"]
                base = {"model": sft_policy, "data": pairs, "loss": {"beta": value}, **common}
            else:  # preferred_ft: SFT on the chosen replies
                cls, train, steps_key, stage_deps = SFTConfig, train_sft, "max_steps", deps["pairs"]
                base = {"model": sft_policy, "data": pairs, "target": "chosen", **common}
            result = run_job(runner, name, cls, base, method_section(config, method), train)
            steps = result.summary.get(steps_key) or result.summary.get("steps")
            policies.update(_policy_entries(name, label, value, result, stage_deps + [name], steps))
    return policies


def run_experiment(config: CompareConfig) -> dict:
    root = Path(config.output_dir) / config.run_name
    # Prompts first: a data error stops the run before anything is written.
    train_prompts, eval_prompts, report = load_prompt_splits(config.prompts, config.seed)
    prompt_texts = [p.prompt for p in train_prompts]
    if any(not isinstance(p, str) for p in prompt_texts):
        raise ConfigError("prompts: jobs.compare needs plain-text prompts (review openings), not chat messages")
    save_config(config, root)
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    runner = StageRunner(root)
    common = {"seed": config.seed, "torch_threads": config.torch_threads}
    print(f"[prompts] {len(train_prompts)} train / {len(eval_prompts)} held-out; {json.dumps(report)}")

    # 1. The SFT policy (or the given model when it already is one).
    sft_stages: list[str] = []
    if config.sft is not None:
        sft = run_job(runner, "sft", SFTConfig, {"model": config.model, **common}, config.sft, train_sft)
        sft_policy, sft_stages = sft.summary["checkpoint"], ["sft"]
    else:
        sft_policy = config.model
    policies: dict[str, dict] = {"SFT": {"method": "SFT", "param": None, "step": 0, "checkpoint": sft_policy,
                                         "stages": sft_stages, "own_fraction": 1.0}}

    # 2. The preference dataset: SFT samples of the training prompts, every pair labelled by the gold scorer.
    pref_key = {"policy": sft_policy, "gold": config.gold_scorer, "prompts": dataclasses.asdict(config.prompts),
                "preference": dataclasses.asdict(config.preference), "seed": config.seed}
    pref = runner.run("preference_data", pref_key, lambda folder: build_preference_data(
        sft_policy, prompt_texts, config.gold_scorer, config.preference, folder / "pairs.jsonl", seed=config.seed,
        torch_threads=config.preference.torch_threads or config.torch_threads, backend=config.generation_backend))
    pairs = {"train": f"jsonl:{pref.summary['path']}", "eval_fraction": 0.1}
    pref_stages = sft_stages + ["preference_data"]

    # 3. Reward model on the SFT backbone, normalised on SFT samples.
    reward = run_job(runner, "reward", RewardTrainConfig,
                     {"model": sft_policy, "data": pairs, "normalize": {"policy": sft_policy}, **common},
                     config.reward, train_reward)
    deps = {"gold": sft_stages, "pairs": pref_stages, "rm": pref_stages + ["reward"]}

    # 4. Every trained method over its sweep.
    policies.update(train_methods(runner, config, sft_policy, pairs, reward.summary["checkpoint"], deps))

    # 5. Evaluation of every policy on the held-out prompts (the SFT policy is the win-rate baseline).
    tokenizer = load_tokenizer(sft_policy)
    eval_ids = [tokenizer(p.prompt, add_special_tokens=True)["input_ids"] for p in eval_prompts][: config.eval.num_prompts]
    evaluations = evaluate_all(runner, config, policies, sft_policy, eval_ids)

    # 6. Best-of-N with the learned reward (its own sampling; KL is analytic). Its pool (SFT samples of
    # the evaluation prompts, scored by both the reward model and the gold scorer) is also where the
    # reward model's rank correlation with gold is measured.
    best_of_n_rows, pool = _best_of_n_stage(runner, config, sft_policy, reward.summary["checkpoint"], deps["rm"])
    diagnostics = reward_model_diagnostics(reward.summary, pool, gap=config.preference.min_gap, seed=config.seed)
    bon_differences = None if pool is None else best_of_n_differences(pool, int(pool["sample_index"].max()) + 1,
                                                                      seed=config.seed)
    report_path = write_report(root, config, policies, evaluations, runner.results, best_of_n_rows,
                               reward_model=diagnostics, best_of_n_differences=bon_differences)
    examples = pd.read_csv(root / "tables" / "examples.csv", keep_default_na=False)
    for _, row in examples.groupby("run").head(1).iterrows():
        print(f"[sample] {row['run']:>14}: {row['prompt']!r} -> {row['continuation']!r} (gold {row['gold']:+.3f})")
    print((root / "summary.txt").read_text().rstrip())
    print(f"[report] {report_path}")
    return {"report": str(report_path), "stages": {k: v.skipped for k, v in runner.results.items()}}


def evaluate_all(runner: StageRunner, config: CompareConfig, policies: dict, sft_policy: str,
                 eval_ids: list[list[int]]) -> dict[str, pd.DataFrame]:
    """Each policy's held-out samples, one cached stage per policy, all through one evaluator."""
    evaluations: dict[str, pd.DataFrame] = {}
    shared: dict[str, Any] = {}  # the judge and one evaluator for every policy, started on first need

    def evaluator() -> PolicyEvaluator:
        if not shared:
            shared["judge"] = gold_judge(config.gold_scorer, sft_policy)
            shared["evaluator"] = PolicyEvaluator(sft_policy, config.eval, shared["judge"],
                                                  torch_threads=config.eval.torch_threads or config.torch_threads,
                                                  backend=config.generation_backend,
                                                  generation_options=config.eval.generation_options or None)
        return shared["evaluator"]

    try:
        for run, info in policies.items():
            key = {"policy": info["checkpoint"], "reference": sft_policy, "eval": dataclasses.asdict(config.eval),
                   "prompts": eval_ids, "gold": config.gold_scorer, "seed": policy_seed(config.seed, run)}

            def go(folder: Path, info=info, run=run) -> dict:
                samples = evaluator().evaluate(info["checkpoint"], eval_ids, seed=policy_seed(config.seed, run))
                samples.to_parquet(folder / "samples.parquet")
                return {"samples_path": str(folder / "samples.parquet"),
                        "tokens_generated": int(samples["response_ids"].map(len).sum()),
                        **summarize(samples, config.eval, config.seed)}

            result = runner.run(f"eval-{run}", key, go)
            evaluations[run] = pd.read_parquet(result.summary["samples_path"])
    finally:
        if shared:
            shared["evaluator"].shutdown()
            shared["judge"].shutdown()
    return evaluations


def _best_of_n_stage(runner: StageRunner, config: CompareConfig, sft_policy: str, reward_model: str,
                     stages: list[str]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The Best-of-N table and its pool of scored samples (None, None when the method is not chosen)."""
    if "best_of_n" not in config.methods:
        return None, None
    base = {"model": sft_policy, "reward": {"kind": "learned", "model": reward_model}, "gold_scorer": config.gold_scorer,
            "data": dataclasses.asdict(config.prompts), "split": "eval", "num_prompts": config.eval.num_prompts,
            "max_new_tokens": config.eval.max_new_tokens,
            "seed": config.seed, "torch_threads": config.torch_threads, "backend": config.generation_backend}
    result = run_job(runner, "best-of-n", BestOfNConfig, base, config.best_of_n, run_best_of_n)
    table = pd.read_csv(result.summary["csv"])
    table["stages"] = [stages + ["best-of-n"]] * len(table)
    return table, pd.read_parquet(Path(result.summary["csv"]).parent / "samples.parquet")


def main(argv=None) -> int:
    return run_cli(CompareConfig, run_experiment, "python -m jobs.compare", __doc__, argv,
                   "key.sub=value overrides, e.g. dpo_betas=[0.1,0.5]",
                   same_config_continues=True)  # a rerun of the same config continues (finished stages skipped)


if __name__ == "__main__":
    raise SystemExit(main())
