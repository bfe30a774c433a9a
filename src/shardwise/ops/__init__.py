"""DeepSpeed's ``deepspeed.ops`` optimizer classes that scripts construct themselves
(``deepspeed.ops.adam.FusedAdam``, ``DeepSpeedCPUAdam``), as torch optimizers: shardwise
steps any torch optimizer on any tier, so no custom kernels are needed."""
from shardwise.ops import adam  # noqa: F401
