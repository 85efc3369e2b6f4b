"""Reference log-probs of every pair, computed once by the ReferenceActor and cached on disk.

The cache key covers the reference model (name, and for local folders the weight files' sizes and
times) and the exact token ids of every pair, so a change of data, tokenization or model misses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from actors.math.batch import collate_pairs
from actors.models import cache_root, resolve_model_path
from jobs.run.batching import EncodedPair


def model_fingerprint(model: str) -> str:
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        return model
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return json.dumps([model] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def cache_key(model: str, pairs: list[EncodedPair]) -> str:
    digest = hashlib.sha256(model_fingerprint(model).encode())
    for p in pairs:
        digest.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return digest.hexdigest()[:24]


def reference_logps(reference, model: str, pairs: list[EncodedPair], pad_token_id: int, *,
                    chunk_pairs: int = 32, cache_dir: str | Path | None = None,
                    method: str = "logprobs") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Summed response log-probs under the reference for (chosen, rejected); also whether it was cached.

    ``method`` names the actor method: ``logprobs`` (a ReferenceActor) or ``reference_logprobs`` (a LoRA
    policy with its adapters disabled: the same base model, so the same cache entry)."""
    folder = Path(cache_dir) if cache_dir else cache_root() / "reference_logps"
    path = folder / f"{cache_key(model, pairs)}.safetensors"
    if path.exists():
        data = load_file(str(path))
        return data["chosen"], data["rejected"], True
    chosen, rejected = [], []
    for start in range(0, len(pairs), chunk_pairs):
        chunk = pairs[start:start + chunk_pairs]
        batch = collate_pairs([p.prompt_ids for p in chunk], [p.chosen_ids for p in chunk],
                              [p.rejected_ids for p in chunk], pad_token_id)
        sums = reference.run_one(method, batch)["sum"]
        chosen.append(sums[: len(chunk)])
        rejected.append(sums[len(chunk):])
    result = {"chosen": torch.cat(chosen).contiguous(), "rejected": torch.cat(rejected).contiguous()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(result, str(tmp))
    os.replace(tmp, path)
    return result["chosen"], result["rejected"], False
