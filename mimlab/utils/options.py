"""Every option is checked before anything is built or read, and all problems are reported at once, naming the key.

* Each value given to a ``_target_`` is checked against the type annotation of the argument that receives it
  (walking ``**kwargs`` up the class hierarchy), with pydantic's lax validation: ``masking.ratio=abc`` against
  ``ratio: float``, ``nan_guard=skp`` against ``Literal["stop", "skip", "off"]``, ``trainer.precision=fp8`` against
  Lightning's precision literals. Arguments whose annotation pydantic cannot check (modules, tensors) are left to
  the constructor, which checks ranges (``data.batch_size >= 1``, ``masking.ratio`` in (0, 1)) itself.
* On the command line, ``key=`` with nothing after ``=`` (an unset shell variable, e.g. ``task.pretrained=$CKPT``).
"""

from __future__ import annotations

import inspect
import re
import typing
from functools import cache
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError, PydanticUserError

_LAX = ConfigDict(coerce_numbers_to_str=True)
_REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # a plain ${a.b} interpolation


class OptionError(ValueError):
    """One or more config options are invalid; the message lists each key, its value and what is expected."""


@cache
def _arguments(target: str) -> tuple[dict[str, Any], bool]:
    """({argument: annotation or None}, takes ``**kwargs``) of the callable ``target``; for a class, an ``__init__``
    with ``**kwargs`` is assumed to pass them on to its base class's ``__init__``, whose arguments are added; a
    classmethod factory (a part's ``attach(parts, **settings)``, :mod:`mimlab.models.parts`) passes its settings on to
    its class's ``__init__`` the same way."""
    fn = get_object(target)
    owner = fn.__self__ if inspect.ismethod(fn) and inspect.isclass(fn.__self__) else None
    if inspect.isclass(fn) or owner is not None:
        cls = fn if owner is None else owner
        callables = [k.__dict__["__init__"] for k in cls.__mro__ if "__init__" in k.__dict__]
        callables = callables if owner is None else [fn, *callables]
    else:
        callables = [fn]
    arguments: dict[str, Any] = {}
    open_ended = False
    for call in callables:
        try:
            params = inspect.signature(call).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            return arguments, True
        try:
            hints = typing.get_type_hints(call, include_extras=True)
        except Exception:  # unresolvable forward references: check names only
            hints = {}
        for name, param in params.items():
            if name not in ("self", "parts") and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                arguments.setdefault(name, hints.get(name))
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return arguments, open_ended
        open_ended = True  # a **kwargs may also go elsewhere (DDPStrategy's go to torch's DDP): names are not checked
    return arguments, open_ended


@cache
def _adapter(annotation: Any) -> TypeAdapter | None:
    try:
        return TypeAdapter(annotation, config=_LAX)
    except (PydanticSchemaGenerationError, PydanticUserError, TypeError, NameError):
        return None


def _has_target(value: Any) -> bool:
    if isinstance(value, DictConfig):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, ListConfig):
        return any(_has_target(v) for v in value)
    return False


def _source_key(raw: Any, key: str, path: str) -> str:
    """The key the user sets: ``nan_guard`` for ``guard.mode: ${nan_guard}``, else ``<path>.<key>``."""
    match = _REFERENCE.fullmatch(raw) if isinstance(raw, str) else None
    return match.group(1) if match else f"{path}.{key}"


def _check_call(node: DictConfig, path: str) -> list[tuple[str, str]]:
    """(key, problem) for each argument of ``node``'s ``_target_`` that does not fit its annotation."""
    target = node._target_
    try:
        arguments, open_ended = _arguments(target)
    except Exception as err:  # reported as a problem of this key
        return [(f"{path}._target_", f"{path}._target_={target!r} cannot be imported: {err}")]
    name = target.removesuffix(".attach").rsplit(".", 1)[-1]  # a part's attach factory: named by its class
    raw = OmegaConf.to_container(node, resolve=False)
    problems = []
    for key in node.keys():
        if str(key).startswith("_") and str(key).endswith("_"):
            continue
        if key not in arguments:
            if not open_ended:
                problems.append((f"{path}.{key}", f"{path}.{key}: {name} takes no argument {key!r}"))  # type: ignore[str-bytes-safe]
            continue
        annotation = arguments[key]
        try:
            value = node[key]
            if annotation is None or _has_target(value):
                continue
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:  # refers to a part this task does not use; Hydra reports it if it is used
            continue
        adapter = _adapter(annotation)
        if adapter is None:
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as err:
            reason = "; ".join(e["msg"] for e in err.errors()[:3])
            source = _source_key(raw[key], key, path)  # type: ignore[call-overload, index]
            problems.append((source, f"{source}={value!r}: {reason} ({name} argument {key})"))
    return problems


def _walk(node: Any, path: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
            problems += _check_call(node, path)
        for key in node.keys():
            if not OmegaConf.is_interpolation(node, key):  # type: ignore[arg-type]  # interpolated nodes are checked where they are defined
                problems += _walk(node[key], f"{path}.{key}" if path else str(key))  # type: ignore[str-bytes-safe]
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_interpolation(node, i):
                problems += _walk(node[i], f"{path}[{i}]")
    return problems


def option_problems(cfg: DictConfig) -> list[str]:
    """Every ``_target_`` argument checked against its annotation (see module docstring)."""
    first: dict[str, str] = {}
    for key, problem in _walk(cfg, ""):
        first.setdefault(key, problem)  # a key read by several parts is reported once
    return list(first.values())


def validate_options(cfg: DictConfig) -> None:
    """Raise :class:`OptionError` listing every invalid option of ``cfg``."""
    problems = option_problems(cfg)
    if problems:
        raise OptionError("invalid config option(s):\n  " + "\n  ".join(problems))


def empty_override_messages(args: list[str]) -> list[str]:
    """A message for each command-line ``key=`` with nothing after ``=`` (``key=null`` unsets a key on purpose)."""
    return [
        f"{arg} has no value (an unset shell variable?); give one, or write {arg}null to unset it"
        for arg in args
        if not arg.startswith(("-", "~")) and arg.endswith("=") and arg.count("=") == 1
    ]
