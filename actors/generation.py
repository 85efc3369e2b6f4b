"""Generation workers: one interface, two backends (Hugging Face ``generate``, and vLLM in ``actors.vllm_backend``).

A backend turns prompt token ids into ``Completion``s: response ids (ending at EOS when one was
emitted), the log-prob of each sampled token under the distribution it was drawn from, and why it
stopped. That distribution is softmax(logits / T) after any top-k / top-p truncation (the "processed"
log-probs); for greedy decoding (T = 0), the model's temperature-1 distribution. Rollouts for training
(T > 0, no truncation: see ``jobs.drivers.ppo_config.check_on_policy_sampling``) thus carry exactly the
log-probs a trainer recomputes at the same temperature (``sequence_logprobs(..., temperature=T)``).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

import torch

from actors.math.batch import collate_sequences, left_pad
from actors.math.logprobs import position_ids_from_mask, sequence_logprobs, token_logprobs
from actors.models import folder_weights, load_causal_lm, load_tokenizer, resolve_model_path
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything
from actors.sampling import Completion, GenerationBackend, SamplingConfig


GENERATION_BACKENDS = ("hf", "vllm", "auto")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_supports(model_path: str | None) -> bool:
    """Whether vLLM can host this model here: its CPU attention needs a head size of at least 32
    (the built-in ``tiny`` test model has 16). GPU builds have no such floor."""
    if model_path is None or torch.cuda.is_available():
        return True
    import json
    from pathlib import Path

    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        return True
    config = json.loads(config_file.read_text())
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))
    return head_dim >= 32


def resolve_backend(name: str, model_path: str | None = None) -> str:
    """``auto`` means vLLM where it is installed and can host the model (checked where the generator
    runs), else HF."""
    if name not in GENERATION_BACKENDS:
        raise ValueError(f"generation backend must be one of {GENERATION_BACKENDS}, got {name!r}")
    if name == "auto":
        return "vllm" if vllm_available() and vllm_supports(model_path) else "hf"
    return name


def _cut_at_stop(tokens: list[int], stop_ids: set[int], pad_id: int) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


class HFGenerationBackend:
    """``model.generate`` in micro-batches; log-probs of the processed scores (what the sampler drew from)
    gathered at the sampled tokens."""

    def __init__(self, model: str, dtype: str = "float32", micro_batch_size: int = 64):
        self.device = pick_device()
        self.model = load_causal_lm(model, dtype=dtype, device=self.device)
        self.tokenizer = load_tokenizer(model)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def generate(self, prompt_ids, sampling):
        stop_ids = {self.tokenizer.eos_token_id, *sampling.stop_token_ids}
        pad_id = self.tokenizer.pad_token_id
        rows = [(i, j, list(p)) for i, p in enumerate(prompt_ids) for j in range(sampling.n)]
        torch.manual_seed(sampling.seed)
        completions: list[Completion] = []
        for start in range(0, len(rows), self.micro_batch_size):
            chunk = rows[start:start + self.micro_batch_size]
            input_ids, attention_mask = left_pad([r[2] for r in chunk], pad_id)
            greedy = sampling.temperature == 0
            # top_k=0 is passed as 0, not None: transformers fills an unset top_k with 50, which would
            # truncate the sampler that the trainer scores as untruncated.
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else sampling.top_k, eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id, return_dict_in_generate=True, output_scores=True,
            )
            new_tokens = out.sequences[:, input_ids.shape[1]:].cpu()
            # out.scores: one [b, V] tensor per step, after the processors (logits / T, then top-k / top-p
            # as -inf), i.e. the sampler's distribution; gathered step by step so no [b, steps, V] copy is built.
            logps = torch.stack([token_logprobs(step.cpu(), new_tokens[:, s]) for s, step in enumerate(out.scores)], 1)
            for k, (i, j, prompt) in enumerate(chunk):
                tokens, reason = _cut_at_stop(new_tokens[k].tolist(), stop_ids, pad_id)
                completions.append(Completion(i, j, prompt, tokens, logps[k, : len(tokens)].tolist(), reason))
        return completions

    @torch.no_grad()
    def response_logprobs(self, prompt_ids, response_ids):
        """Teacher-forced log-probs of given responses, one list per row."""
        result: list[list[float]] = []
        for start in range(0, len(prompt_ids), self.micro_batch_size):
            prompts = prompt_ids[start:start + self.micro_batch_size]
            responses = response_ids[start:start + self.micro_batch_size]
            batch = collate_sequences(prompts, responses, self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
            out = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
            for row, prompt in enumerate(prompts):
                first = len(prompt) - 1
                result.append(out.token_logps[row, first:first + len(responses[row])].cpu().tolist())
        return result

    def load_weights(self, weights):
        self.model.load_state_dict(weights, strict=True)


class GenerationActor:
    """One generation worker. ``backend='hf'`` (always available), ``'vllm'`` (when installed) or ``'auto'``.

    ``backend_options`` go to the vLLM backend (see ``actors.vllm_backend.VLLMGenerationBackend``).
    ``lora``: the policy's LoRA options. vLLM then serves synced adapters (``accepts_adapters``); the HF
    backend ignores it and takes the policy's merged full weights.
    """

    role = "generator"

    def __init__(self, model: str, *, backend: str = "hf", seed: int = 0, torch_threads: int | None = None,
                 dtype: str = "float32", micro_batch_size: int = 64, backend_options: dict | None = None,
                 lora: dict | None = None):
        quiet_transformers()
        self.threads = configure_threads(torch_threads)
        seed_everything(seed)
        self.model_name = model
        path = resolve_model_path(model)
        self.backend_name = resolve_backend(backend, path)
        start = time.perf_counter()
        if self.backend_name == "hf":
            # With backend='auto' on a machine without vLLM, vLLM's options have nothing to configure.
            if backend_options and backend == "hf":
                raise ValueError(f"backend_options {sorted(backend_options)} apply to the vllm backend only")
            self.backend: GenerationBackend = HFGenerationBackend(path, dtype=dtype, micro_batch_size=micro_batch_size)
        else:
            from actors.vllm_backend import VLLMGenerationBackend  # imported only where vLLM is installed

            # A LoRA policy's options: vLLM starts with LoRA enabled and takes adapter-only syncs.
            options = {"seed": seed, "threads": torch_threads, **({"lora": lora} if lora else {}),
                       **(backend_options or {})}
            self.backend = VLLMGenerationBackend(path, dtype=dtype, **options)
        self.start_seconds = time.perf_counter() - start
        self.weights_version = 0

    def info(self) -> dict:
        return describe_actor(self.role, getattr(self.backend, "device", "cpu"), backend=self.backend_name,
                              model=self.model_name, weights_version=self.weights_version,
                              start_seconds=self.start_seconds,
                              weight_sync=getattr(self.backend, "weight_sync", "load_state_dict"),
                              lora_adapters=self.accepts_adapters())

    def accepts_adapters(self) -> bool:
        """Whether ``update_weights`` takes LoRA adapter tensors alone (a LoRA-enabled vLLM engine)."""
        return bool(getattr(self.backend, "lora_enabled", False))

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig | dict) -> dict:
        sampling = SamplingConfig(**sampling) if isinstance(sampling, dict) else sampling
        sampling.validate()
        start = time.perf_counter()
        completions = self.backend.generate(prompt_ids, sampling)
        seconds = time.perf_counter() - start
        return {"completions": completions, "seconds": seconds,
                "tokens": sum(len(c.response_ids) for c in completions), "weights_version": self.weights_version}

    def response_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> dict:
        """The generator's own teacher-forced log-probs of given responses (to check weight sync)."""
        return {"logprobs": self.backend.response_logprobs(prompt_ids, response_ids),
                "weights_version": self.weights_version}

    def update_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> dict:
        start = time.perf_counter()
        self.backend.load_weights(weights)
        self.weights_version = version if version is not None else self.weights_version + 1
        return {"seconds": time.perf_counter() - start, "weights_version": self.weights_version}

    def load_model_folder(self, path: str) -> dict:
        """Swap in the weights of a saved policy of the same architecture, in place (no new engine):
        one generator then serves every policy an evaluation stage compares."""
        weights = folder_weights(path)
        if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied embeddings are saved once
        out = self.update_weights(weights)
        self.model_name = path
        return out

    def close(self) -> None:
        """Stop the backend's engine processes (vLLM); call before killing the actor."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


def generate_sharded(group, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                     retries: int = 0) -> list[Completion]:
    """Split prompts across a group of GenerationActors, gather completions in prompt order.

    Shard k samples with seed ``sampling.seed + k`` so shards never repeat each other's draws.
    With ``retries > 0``, a shard whose actor dies is re-run (same prompts, same seed, so the same
    samples) on a surviving actor of the group; only the lost shard is redone.
    """
    shards = group.shard(list(range(len(prompt_ids))))
    work = {k: ([prompt_ids[i] for i in shard], {**asdict(sampling), "seed": sampling.seed + k})
            for k, shard in enumerate(shards) if shard}
    if retries <= 0:
        refs = [group.actors[k].generate.remote(*args) for k, args in work.items()]
        results = dict(zip(work, group.get(refs, "generate")))
    else:
        results = _generate_with_retries(group, work, retries)
    completions: list[Completion] = []
    for k in work:
        for c in results[k]["completions"]:
            c.prompt_index = shards[k][c.prompt_index]
            completions.append(c)
    return completions


def _generate_with_retries(group, work: dict[int, tuple], retries: int) -> dict[int, dict]:
    import ray
    from ray.exceptions import RayActorError

    from actors.group import ActorCallError

    pending = {group.actors[k].generate.remote(*args): (k, k) for k, args in work.items()}  # ref -> (shard, actor)
    results: dict[int, dict] = {}
    dead: set[int] = set()
    attempts = dict.fromkeys(work, 0)
    deadline = time.monotonic() + group.call_timeout_s
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise ActorCallError(f"{group.role}.generate did not finish within {group.call_timeout_s:.0f} s")
        shard, actor = pending.pop(ready[0])
        try:
            results[shard] = ray.get(ready[0])
        except RayActorError as exc:
            dead.add(actor)
            attempts[shard] += 1
            live = [i for i in range(len(group.actors)) if i not in dead]
            if attempts[shard] > retries or not live:
                raise ActorCallError(f"{group.role}.generate: shard {shard} lost after {attempts[shard]} "
                                     f"attempt(s) ({len(live)} actor(s) left): {exc}") from exc
            target = live[shard % len(live)]
            print(f"[retry] {group.role}: actor {group.names[actor]} died; re-running shard {shard} "
                  f"on {group.names[target]}")
            pending[group.actors[target].generate.remote(*work[shard])] = (shard, target)
    return results
