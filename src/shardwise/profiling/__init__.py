"""Observers that measure a run (see [Note: observers] in ``shardwise/observers.py``):

- :mod:`shardwise.profiling.timers`: ``wall_clock_breakdown``: device-synchronised forward /
  backward / step times and the time blocked in collectives, every ``steps_per_print`` steps.
- :mod:`shardwise.profiling.flops`: ``flops_profiler``: per-module parameters, MACs, FLOPs
  (forward and backward, counted with ``torch.utils.flop_counter``) and forward latency of one
  optimizer step, as a table and as data; correct at ZeRO stage 3 (full shapes, gathered
  tensors).
- :mod:`shardwise.profiling.comms`: ``comms_logger``: every collective shardwise issues
  (through the recorder of ``shardwise/comm/collectives.py``), counted with its message size,
  time, algorithm and bus bandwidth; a summary table at ``close()`` / exit.
"""
