"""``Plan.compile``: the config's ``compile`` section checked against torch and frozen into
``plan.CompilePolicy`` (keys: ``schema_compile.py``; what is compiled: ``shardwise/compile.py``).

The backend is a name torch.compile knows (``torch._dynamo.list_backends``, debug backends
such as ``aot_eager`` included) or ``"package.module:function"``, imported here so that a
typo is a ConfigError before any rank starts; ``mode`` is one of torch's modes and needs the
inductor backend; ``kwargs`` holds torch.compile's keyword arguments only. Unknown names come
with a "did you mean"."""
from __future__ import annotations

import difflib
from typing import Any

from shardwise.config.plan import CompilePolicy
from shardwise.errors import ConfigProblem


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def _backend(name: str, problems: list[ConfigProblem]) -> None:
    from shardwise.compile import known_backends, load_custom_backend

    if ":" in name:
        try:
            load_custom_backend(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
            problems.append(ConfigProblem("compile.backend", f"custom backend {name!r} could not be loaded: "
                                          f"{type(exc).__name__}: {exc}",
                                          'give "package.module:function" of an importable dynamo backend'))
        return
    if name == "inductor":  # torch's default: no need to ask dynamo (slow to import)
        return
    known = known_backends()
    if name not in known:
        problems.append(ConfigProblem("compile.backend", f"unknown torch.compile backend {name!r}",
                                      f"{_did_you_mean(name, known)}known backends: "
                                      f"{', '.join(k for k in known if 'TESTING' not in k)}; or "
                                      '"package.module:function" for a custom one'))


# torch.compile's arguments as JSON can hold them ("options": inductor's config names, which
# inductor itself checks when it compiles)
_VALUE_OK = {
    "fullgraph": (lambda v: isinstance(v, bool), "true or false"),
    "disable": (lambda v: isinstance(v, bool), "true or false"),
    "dynamic": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "mode": (lambda v: v is None or isinstance(v, str), "a mode name or null"),
    "options": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                "an object of inductor config names"),
}


def resolve_compile(section: Any, problems: list[ConfigProblem]) -> CompilePolicy:
    from shardwise.compile import COMPILE_KWARGS, MODES

    kwargs = dict(section.kwargs or {})
    _backend(section.backend, problems)
    for key in kwargs:
        if key == "backend":
            problems.append(ConfigProblem("compile.kwargs.backend", "the backend has its own key",
                                          'move it to "compile": {"backend": ...}'))
        elif key not in COMPILE_KWARGS:
            problems.append(ConfigProblem(f"compile.kwargs.{key}", f"torch.compile has no argument {key!r}",
                                          f"{_did_you_mean(key, list(COMPILE_KWARGS))}it takes "
                                          f"{', '.join(COMPILE_KWARGS)}"))
        elif key in _VALUE_OK and not _VALUE_OK[key][0](kwargs[key]):
            problems.append(ConfigProblem(f"compile.kwargs.{key}", f"must be {_VALUE_OK[key][1]}, got "
                                          f"{type(kwargs[key]).__name__} {kwargs[key]!r:.60}"))
    mode = section.mode
    if "mode" in kwargs:
        if mode is not None and kwargs["mode"] != mode:
            problems.append(ConfigProblem("compile.kwargs.mode", "compile.mode is given too",
                                          "give the mode once (compile.mode)"))
        mode = kwargs.pop("mode")
    where = "compile.mode" if section.mode is not None else "compile.kwargs.mode"
    if mode is not None and mode not in MODES:
        problems.append(ConfigProblem(where, f"unknown torch.compile mode {mode!r}",
                                      f"{_did_you_mean(str(mode), list(MODES))}modes: {', '.join(MODES)}"))
    elif mode not in (None, "default") and section.backend != "inductor":
        problems.append(ConfigProblem(where, f"mode {mode!r} is an inductor setting; backend "
                                      f"{section.backend!r} has no modes",
                                      'use backend "inductor" or remove the mode'))
    kwargs.pop("backend", None)
    return CompilePolicy(enabled=section.enabled, backend=section.backend, mode=mode,
                         kwargs=tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
