"""The memory formulas of tensor and pipeline parallelism ([Note: parallel memory model] in
``shardwise/planner_parallel.py``): which dimension a tp style shards, DTensor's chunk sizes, the
micro-batches a pipeline stage holds at once, and a transformer's saved-activation bytes per
micro-batch (with tp, sequence parallelism and ``partition_activations``). Pure functions,
beside ``memory_model.py``'s ZeRO formulas; the planner and the estimator both use them."""
from __future__ import annotations


def tp_shard_dim(kind: str, param: str, style: str) -> int | None:
    """The dimension torch's ``ColwiseParallel`` / ``RowwiseParallel`` shard a parameter on, None
    where it stays replicated (a rowwise Linear's bias, every LayerNorm / sequence_parallel
    parameter): Linear colwise weight and bias 0, rowwise weight 1; Embedding colwise 1, rowwise 0."""
    style = {"colwise_gather_output": "colwise", "rowwise_from_replicated": "rowwise"}.get(style, style)
    if style not in ("colwise", "rowwise"):  # replicate, sequence_parallel
        return None
    if kind == "Embedding":
        return 1 if style == "colwise" else 0
    if kind == "Linear":
        return 0 if style == "colwise" else (1 if param == "weight" else None)
    return None


def tp_chunk(n: int, tp: int, tp_rank: int) -> int:
    """Elements of ``tp_rank``'s piece of a dimension of ``n`` (DTensor's ``Shard``: torch.chunk sizes)."""
    size = -(-n // tp)
    lo = min(tp_rank * size, n)
    return min(lo + size, n) - lo


def in_flight(schedule: str, pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a pipeline stage holds at once: GPipe all of them; the
    1F1B family (1F1B, interleaved, zero-bubble: warm-up depth) min(pp - stage, m)."""
    return micro_batches if schedule == "GPipe" else max(1, min(pp - stage, micro_batches))


def block_activation_bytes(seq: int, batch: int, hidden: int, heads: int, pb: int, tp: int = 1,
                           sequence_parallel: bool = False) -> int:
    """One pre-norm block's saved bytes for one micro-batch on tp rank 0 ([Note: activation
    estimate] in estimate.py): of its 16 s*b*h tensors the block input, the two norm outputs and
    the residual are whole on every tp rank (sequence_parallel: the two norm inputs and the fp32
    norm statistics over s/tp too); q, k, v, the attention output, the MLP's 4h input and GELU
    output (12) hold the local heads / columns, the log-sum-exp the local heads."""
    sb, h_loc, a_loc = seq * batch, tp_chunk(hidden, tp, 0), tp_chunk(heads, tp, 0)
    s_loc = tp_chunk(seq, tp, 0) * batch if sequence_parallel else sb
    return (2 * s_loc * hidden + 2 * sb * hidden + 12 * sb * h_loc) * pb + 4 * s_loc * 4 + a_loc * sb * 4


def transformer_activation_bytes(layers: int, seq: int, batch: int, hidden: int, heads: int, vocab: int | None,
                                 pb: int, checkpointed: int = 0, tp: int = 1, sequence_parallel: bool = False,
                                 partition_activations: bool = False, first: bool = True,
                                 last: bool = True, kept_inputs: int | None = None) -> int:
    """Saved bytes of ``layers`` blocks (``checkpointed`` of them keep only their input, / tp with
    ``partition_activations``) for one micro-batch; ``first``: the token / position ids of the
    embeddings; ``last``: the final norm's input and output, its fp32 statistics, the fp32
    log-softmax of the (replicated) logits, the targets and the loss's 4-byte total weight.
    ``kept_inputs``: inputs kept when not one per checkpointed block (a pipeline's chunks of k
    layers: ceil(blocks / k))."""
    sb = seq * batch
    kept_input = (tp_chunk(sb * hidden, tp, 0) if partition_activations else sb * hidden) * pb
    out = (layers - checkpointed) * block_activation_bytes(seq, batch, hidden, heads, pb, tp, sequence_parallel)
    out += (checkpointed if kept_inputs is None else kept_inputs) * kept_input
    if first:
        out += (sb + seq) * 8
    if last:
        out += 2 * sb * hidden * pb + 2 * sb * 4 + (sb * vocab * 4 if vocab else 0) + sb * 8 + 4
    return int(out)


__all__ = ["tp_shard_dim", "tp_chunk", "in_flight", "block_activation_bytes", "transformer_activation_bytes"]
