"""Communication. Two layers ([Note: two comm layers] in ``script_api.py``):

- this package's top level is DeepSpeed's ``deepspeed.comm`` surface for scripts
  (``shardwise.comm.all_reduce(t)``, ``get_rank()``, ``barrier()``, ``init_distributed()``...);
- shardwise's own collectives live in the submodules (``comm.collectives`` on a
  ``GroupContext``, ``comm.context``, ``comm.buckets``, ``comm.health``, ``comm.replicate``);
  all of the library's communication goes through them (architecture principle 6).
"""
from shardwise.comm.script_api import *  # noqa: F401,F403
from shardwise.comm.script_api import __all__  # noqa: F401
