"""Analytic GPU memory estimate of a DPO or PPO preset: per GPU, per role, in GiB.

    python -m jobs.memory_estimate gpu_dpo_llama8b_lora [more presets or YAML paths] [--all-gpu] [--json]

An estimate from formulas, not a measurement (no GPU was available to this repository). Sequences are
counted at their longest (DPO: tokenize.max_length; PPO: max_prompt_length + rollout.max_new_tokens),
so padding and packing only make the real figure smaller. "fits" means at most 90% of the GPU: the
rest is kept for allocator fragmentation and what the formulas leave out (NCCL buffers, kernels' scratch).

Layout, as the drivers ask Ray for it, on one node: every actor, and every bundle of an FSDP2 group (one
per rank), asks for its role's GPU share, `placement.<role>.GPU` (default 1, a whole GPU); a role with
colocate_with takes its share of the other group's bundles and asks for no GPU of its own. Requests are
packed first-fit over the GPUs in the order the drivers create the roles (policy, reference, reward,
critic, generator, judge): a request goes on the first GPU whose shares so far plus its own are <= 1, else
on a new GPU. That is the assumption about Ray (it packs fractional requests onto a partly used GPU before
it opens another one, placement-group bundles included); Ray gives no order guarantee, so a layout whose
memory depends on which of several equal GPUs a request lands on may come out differently. Shares are
only Ray's bookkeeping: the memory on a GPU is the sum of what its roles use. Two ranks of one FSDP2 group
on one GPU (bundles of <= 0.5) are reported as a problem: NCCL needs a GPU per rank. vLLM takes
gpu_memory_utilization x the whole GPU, so a generator sharing a GPU must leave room for the others.
Phases: a GPU's figure is max(startup, training), where startup counts every role's startup figure (an
FSDP2 rank loads the whole model before sharding it) and training leaves out a DPO reference in
precompute mode (released before training), so a reference sharing the policy's GPU adds to the policy's
startup figure, not to its training figure.

Per trainable rank (P parameters, P_t trainable, w bytes per weight, N ranks; sharded states / N):
  weights P*w; gradients P_t*w; optimizer AdamW 2*P_t*w, RMSprop P_t*w (torch keeps the state in the
  parameter's dtype: there is no separate fp32 master copy). offload_optimizer: the state lives on the
  host (single actor), or params, gradients and state do (FSDP2 CPUOffloadPolicy). LoRA: frozen base in
  its dtype, fp32 adapters (peft upcasts them) with their gradients and optimizer state.
  FSDP2 transient: the root module's parameters (embeddings, lm_head, final norm: FSDP2 keeps the root
  gathered after forward) and two decoder layers (current + prefetched) in full, and as much again for
  their unsharded gradients before the reduce-scatter. Startup: a rank loads the whole model onto its GPU
  before sharding it, so a GPU's peak is max(startup, training).
Activations, bytes per token of a micro-batch (b: compute bytes, 2 under bf16 autocast or bf16 weights;
r: residual-stream bytes = weight bytes, fp32 weights keep an fp32 residual even under autocast):
  one decoder layer saves A = b*(2q + 2kv + 2h + 4i) + 16h (q, k, v, attention output, the normed inputs
  of the projections, gate, up, silu(gate), gate*up; RMSNorm upcasts and saves 2 fp32 vectors per norm;
  flash / memory-efficient SDPA keeps no T x T scores), plus 4 * (sum of adapted projections' inputs)
  with LoRA on a non-fp32 base (peft casts each input to the adapters' fp32);
  training: L*A + A (one layer of backward workspace); with gradient checkpointing L*r*h + A (each layer
  keeps its input and is recomputed in backward); inference: A.  Plus 12h (final norm, lm_head input).
  Logits [S, T, V] are counted apart (49k-152k vocabularies make them the largest tensor): training
  b + 4 (fp32 copy, if b is 2) + 8 (two fp32 gradient buffers in backward) bytes each; inference
  b + 4 (if b is 2) + 4 (logsumexp's exp buffer).
  bf16 autocast over fp32 weights also keeps a bf16 copy of every weight through the forward pass (2P
  bytes): autocast caches the casts of trainable leaf weights until its region exits, FSDP2's gathered
  weights included (no MixedPrecisionPolicy here), so the copy is the full model on every rank. Frozen
  LoRA bases are not cached, but their casts are saved for backward (checkpointing: the lm_head's only).
  Checked on CPU (tests/test_gpu_presets.py): the bytes autograd saves in a SmolLM2 training forward
  match the saved part within 0.3% with fp32 weights, with and without checkpointing and under
  autocast; with bf16 weights the formula is an upper bound (<= 1.25x).
vLLM: gpu_memory_utilization x GPU memory, plus (weight sync by CUDA IPC, full weights) the trainer's full
weights, copied onto the generator's GPU at each sync. Every process on a GPU adds 0.5 GiB of CUDA context.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GIB = 2**30
CONTEXT = 0.5 * GIB
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_GIB = 79.6          # an "80 GB" A100/H100 as CUDA reports it (81,559 MiB on an H100 SXM)
FIT_FRACTION = 0.9


@dataclass(frozen=True)
class Arch:
    """A Llama / Qwen2 / Mistral-style decoder (RMSNorm, SwiGLU MLP, grouped-query attention)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False   # Qwen2: q/k/v projections have biases
    head_dim: int | None = None

    @property
    def q(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def projections(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        bias = self.q + 2 * self.kv if self.qkv_bias else 0
        return sum(a * b for a, b in self.projections().values()) + bias + 2 * self.hidden  # 2 RMSNorms

    @property
    def root_params(self) -> int:
        """Everything outside the decoder layers: embeddings, lm_head (unless tied), final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self, lm_head: bool = True) -> int:
        """Exact parameter count; ``lm_head=False``: the backbone alone plus a scalar head (critic, reward)."""
        total = self.layers * self.layer_params + self.root_params
        return total if lm_head else total - (0 if self.tied else self.vocab * self.hidden) + self.hidden + 1

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.projections().items() if name in targets)


# From each model's published config.json on the Hugging Face hub (hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings).
ARCHITECTURES = {
    "Qwen/Qwen2.5-1.5B-Instruct": Arch(1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": Arch(3584, 28, 28, 4, 18944, 152064, tied=False, qkv_bias=True),
    "meta-llama/Llama-3.2-1B-Instruct": Arch(2048, 16, 32, 8, 8192, 128256, tied=True, head_dim=64),
    "meta-llama/Llama-3.2-3B-Instruct": Arch(3072, 28, 24, 8, 8192, 128256, tied=True, head_dim=128),
    "meta-llama/Llama-3.1-8B-Instruct": Arch(4096, 32, 32, 8, 14336, 128256, tied=False),
}
# Gold scorers that hold a model on their GPU: approximate parameter counts (not Llama-style, no formula).
SCORER_PARAMS = {"OpenAssistant/reward-model-deberta-v3-large-v2": 435_000_000}


def architecture(model: str) -> Arch:
    """The table's entry, else the model's config.json (built-ins, local folders, cached hub ids)."""
    if model in ARCHITECTURES:
        return ARCHITECTURES[model]
    from transformers import AutoConfig

    from actors.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(model))
    if c.model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{model}: the estimator knows Llama / Qwen2 / Mistral decoders, not {c.model_type!r}")
    return Arch(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.intermediate_size, c.vocab_size,
                bool(getattr(c, "tie_word_embeddings", False)),
                qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
                head_dim=getattr(c, "head_dim", None))


def activation_parts(arch: Arch, seqs: int, length: int, compute: int, residual: int, *, training: bool = True,
                     checkpointing: bool = False, lm_head: bool = True, lora_inputs: int = 0) -> dict[str, int]:
    """Bytes of one micro-batch: ``saved`` (kept from forward to backward) and ``workspace`` (the backward's
    or an inference pass's temporaries); the module docstring gives the formula."""
    h, tokens = arch.hidden, seqs * length
    layer = compute * (2 * arch.q + 2 * arch.kv + 2 * h + 4 * arch.intermediate) + 16 * h + 4 * lora_inputs
    logits = tokens * arch.vocab if lm_head else 0
    upcast = 4 if compute != 4 else 0
    if not training:
        return {"saved": 0, "workspace": tokens * (layer + 12 * h) + logits * (compute + upcast + 4)}
    kept = arch.layers * (residual * h if checkpointing else layer)
    return {"saved": tokens * (kept + 12 * h) + logits * (compute + upcast), "workspace": tokens * layer + logits * 8}


def activation_bytes(arch: Arch, seqs: int, length: int, compute: int, residual: int, **options) -> int:
    return sum(activation_parts(arch, seqs, length, compute, residual, **options).values())


def trainable_role(arch: Arch, layout, optimizer: str, seqs: int, length: int, autocast: bool,
                   lm_head: bool = True) -> tuple[dict[str, float], float]:
    """(bytes by part on one rank's GPU, bytes at startup) for a policy / critic with this layout."""
    w, n = BYTES[layout.dtype], layout.num_workers
    full = arch.params(lm_head)
    moments = {"adamw": 2, "rmsprop": 1}[optimizer]
    lora_inputs = 0
    if layout.lora:
        from actors.models import DEFAULT_LORA_TARGETS

        targets = layout.lora.get("target_modules") or DEFAULT_LORA_TARGETS
        adapters = arch.lora_params(int(layout.lora.get("r", 8)), targets)
        parts = {"weights": full * w + adapters * 4, "gradients": adapters * 4, "optimizer": moments * adapters * 4}
        if w != 4:
            lora_inputs = sum(a for name, (a, _) in arch.projections().items() if name in targets)
    else:
        parts = {"weights": full * w / n, "gradients": full * w / n, "optimizer": moments * full * w / n}
    offload = layout.offload_optimizer or bool(layout.fsdp.get("cpu_offload"))
    if offload and n > 1:       # FSDP2 CPUOffloadPolicy: sharded params, grads and state on the host
        parts.update(weights=0, gradients=0, optimizer=0)
    elif offload:               # actors.offload: the optimizer state (and its masters) on the host
        parts["optimizer"] = 0
    if n > 1:
        root = arch.root_params if lm_head else arch.params(False) - arch.layers * arch.layer_params
        parts["fsdp gathered"] = 2 * (root + 2 * arch.layer_params) * w
    compute = 2 if autocast else w
    if autocast and w == 4:     # bf16 casts of the weights: autocast's cache and the linears' saved inputs
        frozen_gc = layout.lora and layout.gradient_checkpointing   # keep them through the forward pass
        parts["autocast copies"] = (arch.vocab * arch.hidden if frozen_gc else full) * 2
    parts["activations"] = activation_bytes(arch, seqs, length, compute, w, checkpointing=layout.gradient_checkpointing,
                                            lm_head=lm_head, lora_inputs=lora_inputs)
    parts["cuda context"] = CONTEXT
    return parts, full * w + CONTEXT


def frozen_role(arch: Arch, dtype: str, seqs: int, length: int, autocast: bool = False,
                lm_head: bool = True) -> dict[str, float]:
    w = BYTES[dtype]
    return {"weights": arch.params(lm_head) * w,
            "activations": activation_bytes(arch, seqs, length, 2 if autocast else w, w, training=False,
                                            lm_head=lm_head), "cuda context": CONTEXT}


def scorer_role(spec: str | None) -> tuple[dict[str, float], str]:
    kind, _, arg = (spec or "").partition(":")
    model = arg.partition("@")[0]
    if kind == "hf-reward":     # actors.scorers: on the GPU when there is one; hf-classifier stays on the CPU
        if model not in SCORER_PARAMS:
            return {"cuda context": CONTEXT}, f"{spec}: model not in SCORER_PARAMS, not estimated"
        # fp32 weights; 1 GiB allowance for a scorer's inference batch of 16 (not derived)
        parts = {"weights": SCORER_PARAMS[model] * 4, "activations": GIB, "cuda context": CONTEXT}
        return parts, f"gold scorer {spec} (approx.)"
    return {"cuda context": CONTEXT}, f"gold scorer {spec} (runs on the CPU; CUDA context counted)"


def entry(role: str, parts: dict, note: str = "", startup: float | None = None, precompute: bool = False,
          share: float | None = None) -> dict:
    """One actor's (or rank's) use of its GPU. ``precompute``: present only before training (a DPO
    reference in precompute mode), so it counts in the startup phase and not in the training phase."""
    return {"role": role, "note": note, "parts": parts, "startup": sum(parts.values()) if startup is None else startup,
            "precompute": precompute, "share": share}


@dataclass
class Request:
    """One GPU request to Ray: a single actor, or one bundle (rank) of an FSDP2 group; ``entries`` is what
    runs on that GPU share (a colocated role's rank joins its bundle's entries)."""

    role: str
    share: float
    entries: list
    group: str | None = None    # an FSDP2 group: its ranks must not share a GPU


def gpu_share(config, role: str) -> float:
    """``placement.<role>.GPU``, the share of a GPU each actor or rank of ``role`` asks for (default 1)."""
    return float((config.placement.get(role) or {}).get("GPU", 1.0))


def group_requests(role: str, config, layout, parts: dict, startup: float) -> list[Request]:
    n, share = layout.num_workers, gpu_share(config, role)
    if n == 1:
        return [Request(role, share, [entry(role, parts, "", startup)])]
    return [Request(role, share, [entry(role, parts, f"1 of {n} FSDP2 ranks", startup)], role) for _ in range(n)]


def pack(requests: list[Request]) -> list[list[Request]]:
    """First fit over one node's GPUs in request order (see the module docstring)."""
    gpus: list[list[Request]] = []
    for req in requests:
        for gpu in gpus:
            if sum(r.share for r in gpu) + req.share <= 1 + 1e-9:
                gpu.append(req)
                break
        else:
            gpus.append([req])
    return gpus


def dpo_requests(config) -> list[Request]:
    from actors.math.dpo_losses import REFERENCE_FREE_VARIANTS

    arch, layout = architecture(config.model), config.policy
    parts, startup = trainable_role(arch, layout, config.optimizer.name, 2 * config.micro_batch_size,
                                    config.tokenize.max_length, config.autocast_bf16)
    requests = group_requests("policy", config, layout, parts, startup)
    if config.loss.variant not in REFERENCE_FREE_VARIANTS and not layout.lora:
        ref = architecture(config.reference_model or config.model)
        precompute = config.reference_mode == "precompute"
        note = "precompute phase only; released before training" if precompute else ""
        parts = frozen_role(ref, "float32", config.micro_batch_size, config.tokenize.max_length, config.autocast_bf16)
        requests.append(Request("reference", gpu_share(config, "reference"),
                                [entry("reference", parts, note, precompute=precompute)]))
    return requests


def ppo_requests(config, gpu_gib: float) -> list[Request]:
    arch = architecture(config.model)
    seqs, length = config.ppo.micro_batch_size, config.tokenize.max_prompt_length + config.rollout.max_new_tokens
    pol = config.policy
    parts, startup = trainable_role(arch, pol, config.optimizer.name, seqs, length, False)
    policy = group_requests("policy", config, pol, parts, startup)
    requests = list(policy)
    if not pol.lora:
        ref = architecture(config.reference_model or config.model)
        requests.append(Request("reference", gpu_share(config, "reference"),
                                [entry("reference", frozen_role(ref, "float32", seqs, length))]))
    if config.reward.kind == "learned":
        rm = frozen_role(architecture(config.reward.model), "float32", 8, length, lm_head=False)
        reward = entry("reward", rm, "learned reward model")
    else:
        reward = entry("reward", *scorer_role(config.reward.scorer))
    requests.append(Request("reward", gpu_share(config, "reward"), [reward]))
    critic_model = config.critic_model or (config.reward.model if config.reward.kind == "learned" else config.model)
    cl = config.critic
    parts, startup = trainable_role(architecture(critic_model), cl, config.critic_optimizer.name, seqs, length, False,
                                    lm_head=False)
    if cl.colocate_with == "policy":    # the critic's ranks take a share of the policy's bundles
        if pol.num_workers < cl.num_workers or pol.num_workers == 1:
            raise ValueError("critic.colocate_with policy needs a sharded policy with at least as many workers")
        bundle = gpu_share(config, "policy")
        for k, req in enumerate(policy):
            req.entries[0]["share"] = bundle * pol.share     # each actor asks for its share of the bundle
        for k in range(cl.num_workers):
            policy[k].entries.append(entry("critic", parts, f"1 of {cl.num_workers} FSDP2 ranks, "
                                           f"{cl.share} of the policy's bundle", startup, share=bundle * cl.share))
    else:
        requests += group_requests("critic", config, cl, parts, startup)
    options = config.generation_options
    util = float(options.get("gpu_memory_utilization", 0.5))
    gen = {"vllm reservation": util * gpu_gib * GIB, "cuda context": CONTEXT}
    note = f"vLLM, gpu_memory_utilization {util} of the whole GPU"
    if config.generation_backend == "auto":
        note += " (backend auto: vLLM assumed)"
    if config.generation_backend == "hf":
        gen, note = {"weights": arch.params() * 4, "cuda context": CONTEXT}, "HF generate, fp32 (KV cache not counted)"
    elif not pol.lora and options.get("weight_sync", "auto") in ("auto", "cuda_ipc"):
        gen["weight sync copy"] = arch.params() * BYTES[pol.dtype]
        note += "; full weights copied onto the GPU at each sync (CUDA IPC)"
    requests += [Request("generator", gpu_share(config, "generator"), [entry("generator", dict(gen), note)])
                 for _ in range(config.num_generators)]
    if config.eval_scorer:
        requests.append(Request("judge", gpu_share(config, "judge"), [entry("judge", *scorer_role(config.eval_scorer))]))
    return requests


def gpu_figures(requests: list[Request], limit_gib: float) -> dict:
    """One GPU's figures from the requests packed on it: GiB in the training and startup phases, the
    larger of the two, Ray's share sum, and the problems that make it unusable whatever its memory."""
    entries = [e for r in requests for e in r.entries]
    training = sum(sum(e["parts"].values()) for e in entries if not e["precompute"]) / GIB
    startup = sum(e["startup"] for e in entries) / GIB
    total = max(training, startup)
    problems = []
    groups = [r.group for r in requests if r.group]
    for name in sorted({g for g in groups if groups.count(g) > 1}):
        problems.append(f"{groups.count(name)} ranks of the {name} FSDP2 group on one GPU (bundles of "
                        f"{next(r.share for r in requests if r.group == name)} GPU): NCCL needs a GPU per rank; "
                        "give the group a GPU share above 0.5")
    if total > limit_gib and any(e["role"] == "generator" for e in entries) and len(entries) > 1:
        problems.append("vLLM's gpu_memory_utilization is a fraction of the whole GPU: it leaves too little room "
                        "for the roles sharing this GPU")
    return {"total_gib": round(total, 2), "training_gib": round(training, 2), "startup_gib": round(startup, 2),
            "share": round(sum(r.share for r in requests), 4), "problems": problems,
            "fits": total <= limit_gib and not problems}


def estimate(preset: str, gpu_gib: float = GPU_GIB) -> dict:
    from jobs.run.config import build_config, load_preset

    raw = load_preset(preset)
    if {"rollout", "ppo", "critic"} & set(raw):
        from jobs.drivers.ppo import PPOConfig

        driver, config = "jobs.ppo", build_config(PPOConfig, preset)
        requests = ppo_requests(config, gpu_gib)
    else:
        from jobs.drivers.dpo import DPOConfig

        driver, config = "jobs.dpo", build_config(DPOConfig, preset)
        requests = dpo_requests(config)
    limit = FIT_FRACTION * gpu_gib
    out = []
    for index, packed in enumerate(pack(requests)):
        figures = gpu_figures(packed, limit)
        out.append({"index": index, **figures,
                    "roles": [{"role": e["role"], "share": r.share if e["share"] is None else e["share"], "note": e["note"], "precompute": e["precompute"],
                               "total_gib": round(sum(e["parts"].values()) / GIB, 2),
                               "parts_gib": {k: round(v / GIB, 2) for k, v in e["parts"].items() if v}}
                              for r in packed for e in r.entries]})
    peak = max(g["total_gib"] for g in out)
    return {"preset": preset, "driver": driver, "model": config.model, "params": architecture(config.model).params(),
            "gpu_gib": gpu_gib, "limit_gib": round(limit, 2), "gpus_needed": len(out), "peak_gib": peak,
            "fits": all(g["fits"] for g in out), "gpus": out}


def render(result: dict) -> str:
    size = f"{result['params'] / 1e9:.2f}B" if result["params"] >= 1e8 else f"{result['params'] / 1e6:.1f}M"
    lines = [f"{result['preset']}  ({result['driver']}, {result['model']}, {size} params): "
             f"{result['gpus_needed']} GPU(s) of {result['gpu_gib']} GiB, fit limit {result['limit_gib']} GiB"]
    groups: list[tuple[list[int], dict]] = []   # identical GPUs (the ranks of a group) on one line
    for gpu in result["gpus"]:
        key = json.dumps([(r["role"], r["share"], r["parts_gib"]) for r in gpu["roles"]] + gpu["problems"])
        if groups and groups[-1][1]["key"] == key:
            groups[-1][0].append(gpu["index"])
        else:
            groups.append(([gpu["index"]], {"key": key, "gpu": gpu}))
    for indices, item in groups:
        gpu = item["gpu"]
        name = f"GPU {indices[0]}" + (f"-{indices[-1]}" if len(indices) > 1 else "")
        lines.append(f"  {name}: {gpu['total_gib']:.1f} GiB {'fits' if gpu['fits'] else 'DOES NOT FIT'} "
                     f"(training {gpu['training_gib']:.1f}, startup {gpu['startup_gib']:.1f}; "
                     f"Ray GPU shares {gpu['share']:g})")
        for role in gpu["roles"]:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in role["parts_gib"].items())
            note = f" [{role['note']}]" if role["note"] else ""
            lines.append(f"    {role['role']} (GPU {role['share']:g}){note}: {parts} = {role['total_gib']:.1f} GiB")
        lines += [f"    PROBLEM: {p}" for p in gpu["problems"]]
    lines.append(f"  peak per GPU {result['peak_gib']:.1f} GiB of {result['gpu_gib']} -> "
                 f"{'fits' if result['fits'] else 'does not fit'}")
    return "\n".join(lines)


def gpu_presets() -> list[str]:
    from jobs.run.config import PRESETS

    return sorted(p.stem for p in PRESETS.glob("gpu_*.yaml"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.memory_estimate", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="preset names under jobs/presets or YAML paths")
    parser.add_argument("--all-gpu", action="store_true", help="every gpu_* preset")
    parser.add_argument("--json", action="store_true", help="JSON instead of text")
    parser.add_argument("--gpu-gib", type=float, default=GPU_GIB, help=f"GPU memory in GiB (default {GPU_GIB})")
    args = parser.parse_args(argv)
    names = list(args.presets) + (gpu_presets() if args.all_gpu else [])
    if not names:
        parser.error("name a preset or pass --all-gpu")
    results = [estimate(name, args.gpu_gib) for name in names]
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(render(r) for r in results))
    return 0 if all(r["fits"] for r in results) else 1


if __name__ == "__main__":
    from jobs.run.cli import guarded  # user errors as one line, like every driver

    raise SystemExit(guarded(main))


__all__ = ["ARCHITECTURES", "Arch", "Request", "activation_bytes", "activation_parts", "architecture", "entry",
           "estimate", "gpu_figures", "pack", "trainable_role"]
