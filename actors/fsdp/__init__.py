"""Sharded training groups: one model held by N Ray actors with FSDP2, driven like a single actor.

A ``ShardedActorGroup`` is a role (``policy``, ``critic``) whose N actors form one
``torch.distributed`` process group (NCCL on GPUs, gloo on CPU) over a 1-D device mesh, and hold one
model with ``fully_shard`` applied to each decoder layer and then to the root. The driver calls it
exactly like an ``ActorGroup``: ``call_all(method, ...)`` sends the call to every rank (arguments put
in the object store once) and returns a one-element list holding ONE ObjectRef for the combined
result, which a zero-CPU Ray task builds from the ranks' results.

Data parallelism, exact to the single-worker math:

- A call's micro-batches are exactly those a single actor would form (same ``micro_batch_size``
  over the same batch or PPO minibatch; DPO micro-batches hold whole pairs), dealt round-robin to
  the ranks. So the loss, a row-weighted mean of micro-batch means, is the same function of the
  weights whatever the world size. Each rank weights its micro-batch losses by rows over the GLOBAL
  row count and FSDP sums (not averages) the gradients over ranks, which gives the single-worker
  gradient. The norm for clipping is the global one (DTensor), and the non-finite check is
  all-reduced, so every rank takes (or skips) the same update.
- FSDP's all-gathers and reduce-scatters need every rank in every pass: a rank with fewer
  micro-batches than others runs idle passes (two tokens, loss weighted 0) to stay in step.
- Metrics are row-weighted sums all-reduced in the actors (rank 0's are returned); per-row outputs
  (``logprobs``, ``values``) are computed by the rank that owns the rows and put back in row order.
- Set ``micro_batch_size`` to at most rows / N so that no rank idles.

Weights: ``named_weights`` gathers full tensors one parameter at a time (never the whole model on an
accelerator) into CPU memory on rank 0; the group hands rank 0's ObjectRef to the driver, so
generators' ``update_weights`` take it unchanged. ``weight_sync_stats`` reports the gather time.

State: ``save_state`` writes a ``torch.distributed.checkpoint`` (DCP) folder of the sharded model and
optimizer states plus a small ``trainer_meta.pt`` (schedule, counters, RNG); DCP reshards on load, so
it loads into a group of any size, and a plain single actor's ``load_state`` reads it too. A sharded
group also loads a plain actor's ``trainer_state.pt``. ``save`` exports an HF folder (rank 0 writes
the gathered weights). DCP folders must be on storage all ranks share (one node, or a shared volume).

Placement: one Ray placement group per group (``PACK`` / ``SPREAD`` / ``STRICT_*``), one bundle per
rank; another role can be colocated in the same bundles (``colocate_with=``), each role taking a
``share`` of every bundle (fractional GPUs on GPU clusters).
"""

