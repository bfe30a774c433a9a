"""ZeRO-Offload / ZeRO-Infinity: optimizer state (and masters) kept in host memory or on disk.

- ``aio``: page-aligned buffers, preallocated swap files and the threaded ``pread``/``pwrite``
  engine that moves tensors to and from them (``python -m shardwise.offload.aio`` measures it);
- ``swapdir``: the per-job, per-rank swap directory under ``nvme_path`` (ownership, stale-run
  cleanup, removal at exit);
- ``tiers``: where each optimizer chunk lives (device, host, disk).
"""
