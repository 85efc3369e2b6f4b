"""TRL's DPOTrainer and this project's DPO step, side by side in one process (`jobs.bench dpo --peer trl`).

Same model folder, same token ids (TRL tokenizes the pairs; this project's batch is collated from the
very ids TRL produced), same precision, thread count, optimizer (AdamW, constant lr, clip 1.0),
micro-batch and accumulation, and the same work per step: TRL's ``precompute_ref_log_probs=True``
against reference log-probs this project computes once before its steps. Each side's first step
(allocations, optimizer state, TRL's dataloader start) is reported apart from the median of the rest.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

# The metrics both sides log under the same names on the first step (same DPO, same start: they agree).
FIRST_STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                   "logps/chosen", "logps/rejected")


def _text_pairs(tokenizer, pairs: int, seq_len: int, prompt_len: int, seed: int = 0) -> dict[str, list[str]]:
    """Random-token text, decoded: TRL only accepts text, and re-tokenizing it gives about the lengths
    asked for (the exact ids TRL ends up with are what both sides train on)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)

    def text(n):
        ids = [i for i in torch.randint(100, vocab, (n,), generator=g).tolist() if i not in special]
        return tokenizer.decode(ids)

    response = seq_len - prompt_len
    return {"prompt": [text(prompt_len) for _ in range(pairs)],
            "chosen": [text(response) for _ in range(pairs)],
            "rejected": [text(response) for _ in range(pairs)]}


def _summary(step_seconds: list[float], tokens: float) -> dict:
    first, rest = step_seconds[0], step_seconds[1:] or step_seconds
    median = statistics.median(rest)
    return {"first_step_s": first, "step_seconds": step_seconds, "median_step_s": median,
            "tokens_per_step": tokens, "tokens_per_s": tokens / median}


def run_trl(model_path: str, tokenizer, data: dict, args, lr: float) -> tuple[object, dict, dict]:
    """TRL's DPOTrainer for 1 + repeats optimizer steps; returns (its tokenized dataset, timing, first-step logs)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    pairs = len(data["prompt"])
    micro = min(args.micro_pairs, pairs)
    if pairs % micro:
        raise SystemExit(f"--pairs ({pairs}) must be a multiple of --micro-pairs ({micro}) for the TRL peer")

    class Clock(TrainerCallback):
        """Wall seconds of each optimizer step and the first step's logged metrics."""

        def __init__(self):
            self.seconds, self.logs, self._start = [], [], None

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        config = _dpo_config(DPOConfig, out, micro, pairs, lr, args)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(data),
                             processing_class=tokenizer, callbacks=[clock])
        dataset = trainer.train_dataset
        trainer.train()
    tokens = float(sum(2 * len(p) + len(c) + len(r) for p, c, r in
                       zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])))
    first = {k: float(clock.logs[0][k]) for k in FIRST_STEP_KEYS if k in clock.logs[0]}
    return dataset, _summary(clock.seconds, tokens), first


def _dpo_config(DPOConfig, out: str, micro: int, pairs: int, lr: float, args):
    # bf16=True makes accelerate run the forward under CPU bf16 autocast, as autocast_bf16 does here.
    return DPOConfig(
        output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=pairs // micro,
        max_steps=1 + args.repeats, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,
        bf16=bool(args.bf16), use_cpu=not torch.cuda.is_available(), logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )


def run_rayalign(model: str, dataset, args, lr: float, threads: int) -> tuple[dict, dict, int]:
    """This project's PolicyActor (in this process) on the ids TRL tokenized; reference precomputed once."""
    from actors.math.batch import collate_pairs
    from actors.policy import PolicyActor

    policy = PolicyActor(model, torch_threads=threads, optimizer={"name": "adamw", "lr": lr, "max_grad_norm": 1.0},
                         micro_batch_size=args.micro_pairs, autocast_bf16=bool(args.bf16))
    batch = collate_pairs(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"],
                          pad_token_id=policy.tokenizer.pad_token_id)
    pairs = len(dataset["prompt_ids"])
    ref = policy.logprobs(batch)["sum"]  # the starting policy is the reference, as TRL's precompute
    loss = {"variant": "sigmoid", "beta": args.beta}
    seconds, first = [], None
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        metrics = policy.train_dpo(batch, ref[:pairs], ref[pairs:], loss)
        seconds.append(time.perf_counter() - start)
        first = first or {k: float(metrics[k]) for k in FIRST_STEP_KEYS}
    parameters = sum(p.numel() for p in policy.model.parameters())
    return _summary(seconds, float(metrics["tokens"])), first, parameters


def bench_dpo_peer(args, matmul_gflops) -> dict:
    """Both sides, one after the other; ``matmul_gflops`` (jobs.bench's) gives the peak for the MFU."""
    from actors.models import load_tokenizer, resolve_model_path
    from actors.runtime import configure_threads

    threads = configure_threads(args.threads or os.cpu_count() or 1)
    lr = 1e-6
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args.model)
    data = _text_pairs(tokenizer, args.pairs, args.seq_len, args.prompt_len)
    dataset, trl_run, trl_first = run_trl(model_path, tokenizer, data, args, lr)
    ours, ours_first, parameters = run_rayalign(args.model, dataset, args, lr, threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_gflops(dtype=dtype, threads=threads)
    # Forward + backward of a dense decoder ~ 6 FLOPs per parameter per token (Kaplan et al. 2020);
    # attention's T^2 term and the frozen reference (precomputed on both sides) are not counted.
    flops_per_token = 6 * parameters

    def mfu(rate):
        return rate * flops_per_token / 1e9 / peak

    agreement = {k: abs(ours_first[k] - trl_first[k]) for k in FIRST_STEP_KEYS if k in trl_first}
    return {"benchmark": "dpo_vs_trl", "model": args.model, "pairs": args.pairs, "seq_len": args.seq_len,
            "prompt_len": args.prompt_len, "micro_pairs": args.micro_pairs, "bf16_autocast": bool(args.bf16),
            "torch_threads": threads, "parameters": parameters, "steps_timed": args.repeats,
            "rayalign": ours, "trl": trl_run,
            "rayalign_tokens_per_s": ours["tokens_per_s"], "trl_tokens_per_s": trl_run["tokens_per_s"],
            "ratio_vs_trl": ours["tokens_per_s"] / trl_run["tokens_per_s"], "target_ratio": 1.2,
            "rayalign_first_step": ours_first, "trl_first_step": trl_first,
            "first_step_abs_diff": agreement,
            "rayalign_first_step_s": ours["first_step_s"], "trl_first_step_s": trl_run["first_step_s"],
            "flops_per_token": flops_per_token, "flops_formula": "6 * parameters",
            f"matmul_gflops_{'bf16' if args.bf16 else 'fp32'}": peak,
            "rayalign_mfu": mfu(ours["tokens_per_s"]), "trl_mfu": mfu(trl_run["tokens_per_s"]),
            "load_average_1m": os.getloadavg()[0]}
