"""The building blocks of the config schema: typed fields, the base model, and the models built
from ``schema_keys``' catalogue. Shared by ``schema.py`` and the section modules beside it
(``schema_observe.py``), so that each section can live in the module of its feature area."""
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from shardwise.config import ranges as R
from shardwise.config import schema_keys as K
from shardwise.config.ranges import check_int, check_str, typed


def _annotation(spec: Any) -> Any:
    """Annotation for a catalogue type spec (see ``schema_keys``)."""
    if isinstance(spec, tuple):  # literal choices
        check = check_str if isinstance(spec[0], str) else check_int
        return Annotated[Literal[spec], BeforeValidator(check)]
    nullable, name = spec.endswith("?"), spec.rstrip("?")
    if name in R.KINDS:
        return R.catalogue_type(spec)
    base = {"list": list[Any], "dict": dict[str, Any], "any": Any}[name]
    return Optional[base] if nullable else base


Bool, Str = typed("bool"), typed("str")
_Batch = typed("int", R.BATCH, nullable=True)
_Steps, _OptSteps = typed("int", R.STEPS), typed("int", R.STEPS, nullable=True)
_Elements = typed("int", R.ELEMENTS)
_OptPath = typed("path", nullable=True)  # a non-empty string without NUL bytes


def _default_only(default: Any, accept: tuple | None = None, why: str | None = None) -> Any:
    """A known key shardwise does not implement: accepted at ``default`` (or ``accept``);
    ``why``, where given, is said in the refusal."""
    extra = ({"sw": "default"} | ({"sw_accept": list(accept)} if accept else {})
             | ({"sw_why": why} if why else {}))
    return Field(default, json_schema_extra=extra)


def _inert(default: Any) -> Any:
    """A known key whose every valid value is fine: it changes nothing shardwise does."""
    return Field(default, json_schema_extra={"sw": "inert"})


# --- models ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)
    sw_gate: ClassVar[Optional[str]] = None  # key that switches the section on (see K.Section)
    sw_why: ClassVar[Optional[str]] = None  # said in the section's refusal (K.Section.why)


def _section_model(name: str, section: K.Section) -> type[_Model]:
    fields = {key: _catalogue_field(f"{name}_{key}", entry)
              for key, entry in section.fields.items()}
    model = create_model("".join(p.title() for p in name.split("_")),
                         __base__=_Model, **fields)
    model.sw_gate = section.gate
    model.sw_why = section.why
    return model


def _catalogue_field(name: str, entry: tuple) -> tuple[Any, Any]:
    spec, default, *accept = entry
    if isinstance(spec, K.Section):
        kind = "presence" if spec.presence else "section"
        return Optional[_section_model(name, spec)], Field(None, json_schema_extra={"sw": kind})
    if accept and accept[0] == K.INERT:
        return _annotation(spec), _inert(default)
    return _annotation(spec), _default_only(default, accept[0] if accept else None)
