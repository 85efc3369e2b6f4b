"""WeightDict: weights cross Ray's object store as numpy buffers, exactly, with tied tensors kept tied."""

import pickle

import ray
import torch

from actors.models import load_causal_lm, merged_state_dict, resolve_model_path
from actors.weight_transfer import WeightDict, snapshot


def _weights() -> WeightDict:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(10, 4, generator=gen)
    return WeightDict({"embed.weight": embed, "fp32": torch.randn(3, 5, generator=gen),
                       "bf16": torch.randn(6, generator=gen).to(torch.bfloat16), "scalar": torch.tensor(2.5),
                       "step": torch.tensor([7], dtype=torch.int64), "head.weight": embed})


def test_pickle_sends_each_storage_once_out_of_band_and_restores_values_dtypes_and_ties():
    weights = _weights()
    buffers = []
    payload = pickle.dumps(weights, protocol=5, buffer_callback=buffers.append)
    # five distinct tensors (the head shares the embedding's storage) -> five out-of-band buffers; the in-band
    # payload holds names and dtypes only, not the 40 + 15 + 6 + 1 + 1 numbers
    assert len(buffers) == 5
    assert sum(memoryview(b).nbytes for b in buffers) == 4 * (40 + 15 + 1) + 2 * 6 + 8
    back = pickle.loads(payload, buffers=buffers)
    assert isinstance(back, WeightDict) and list(back) == list(weights)
    for name, tensor in weights.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name  # bit-exact: bytes are moved, not converted
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()


def test_snapshot_copies_once_per_storage_and_detaches_from_the_model():
    weights = _weights()
    copy = snapshot(weights)
    assert copy["head.weight"].data_ptr() == copy["embed.weight"].data_ptr()
    assert copy["embed.weight"].data_ptr() != weights["embed.weight"].data_ptr()
    weights["embed.weight"].add_(1.0)  # the live tensor moves on; the snapshot does not
    assert not torch.equal(copy["embed.weight"], weights["embed.weight"])


@ray.remote
class _Holder:
    def __init__(self, model: str):
        self.model = load_causal_lm(model)

    def named_weights(self):
        return merged_state_dict(self.model)


def test_named_weights_through_a_ray_actor_arrive_exact_and_tied(ray_cluster):
    model = resolve_model_path("tiny")
    local = load_causal_lm(model).state_dict()
    holder = _Holder.remote(model)
    got = ray.get(holder.named_weights.remote())
    assert isinstance(got, WeightDict) and list(got) == list(local)
    for name, tensor in local.items():
        assert torch.equal(got[name], tensor), name
    tied = local["lm_head.weight"].data_ptr() == local["model.embed_tokens.weight"].data_ptr()
    assert (got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()) == tied
    ray.kill(holder)
