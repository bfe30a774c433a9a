"""ZeRO building blocks; the stage-3 user API: ``GatheredParameters``, ``Init``,
``set_fetch_units``, ``register_external_parameter``, and DeepSpeed's ``set_z3_leaf_modules``."""
from shardwise.zero.units import register_external_parameter, set_fetch_units, set_z3_leaf_modules


def __getattr__(name: str):  # imported lazily: they pull in the stage-3 runtime
    if name == "GatheredParameters":
        from shardwise.zero.gathered import GatheredParameters
        return GatheredParameters
    if name == "Init":
        from shardwise.zero.init import Init
        return Init
    raise AttributeError(name)


__all__ = ["GatheredParameters", "Init", "set_fetch_units", "register_external_parameter", "set_z3_leaf_modules"]
