"""The config's ``compile`` section: torch.compile of the model's blocks (``shardwise/compile.py``).

DeepSpeed's keys: ``enabled`` (compile at ``initialize``), ``backend`` (a torch.compile
backend name), ``kwargs`` (torch.compile's other keyword arguments), as DeepSpeed's
``runtime/compiler.py`` spelled them, plus its DeepCompile keys (``schema_keys.DEEPCOMPILE``:
refused while ``deepcompile`` is on, no effect while it is off). shardwise adds ``mode``
(torch.compile's ``mode``, which DeepSpeed passes inside ``kwargs``; either spelling works, not
both). The backend, mode and kwargs names are checked in ``resolve.py`` (the backend list comes
from torch) and resolved into ``plan.CompilePolicy``."""
from typing import Any

from pydantic import create_model

from shardwise.config import schema_keys as K
from shardwise.config.fields import Bool, Str, _Model, _annotation, _catalogue_field


_OptStr, _Dict = _annotation("str?"), _annotation("dict")


class _CompileBase(_Model):
    sw_gate = "deepcompile"  # [Note: known, accepted, refused]: the DeepCompile keys
    sw_why = K.DEEPCOMPILE_WHY
    enabled: Bool = False
    # a name torch._dynamo.list_backends() knows ("inductor", "aot_eager", ...) or
    # "package.module:function" (a custom dynamo backend)
    backend: Str = "inductor"
    mode: _OptStr = None  # torch.compile's mode (inductor only); null: torch's default
    kwargs: _Dict = {}  # torch.compile's fullgraph / dynamic / options / disable / mode


CompileSection: Any = create_model("CompileSection", __base__=_CompileBase, **{
    k: _catalogue_field(f"compile_{k}", e) for k, e in K.DEEPCOMPILE.items()})

__all__ = ["CompileSection"]
