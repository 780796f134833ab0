"""Options made from the deployment config's fields, so a flag is declared once, on its field.

``up``, ``update`` and ``simulate`` each name the config fields they take as flags
(``@takes_config_flags(...)``: the names, or a function that returns them) and receive them as
one ``flags`` dict shaped like the config (``{"port": 8080, "probe": {"path": "/ready"}}``, None
where a flag was left out). A flag's name, help, ``[default: ...]`` and ``--help`` panel come
from its field: its description, its default, and the ``flockctl.server.flags.Flag`` in its
annotation.

Every such option defaults to None (the ``[default: ...]`` in its help is the config's) so that
``flockctl.server.spec_file.resolve`` can tell a flag given from one left out and let a SPEC
file's value stand.

The config is the daemon's, which importing the CLI must not load: a command's signature is made
the first time typer reads it, when it builds the command line.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

    from flockctl.server.flags import Flag

#: The parameter of a command's function that stands for its config flags.
FLAGS_PARAM = "flags"
#: A command's config fields: their names, a function that returns them (it may import the
#: config, which importing the CLI must not), or None for every field a flag sets.
Fields = tuple[str, ...] | Callable[[], tuple[str, ...]] | None


@dataclass(frozen=True)
class ConfigFlag:
    """One flag and the config field it sets."""

    #: The field, and the fields it sits in: ``("probe", "path")``.
    path: tuple[str, ...]
    #: The flag as typed: ``--readiness-path``.
    option: str
    #: The command function's parameter: ``readiness_path``.
    param: str
    #: What typer reads the option as, with its ``typer.Option``.
    annotation: Any

    @property
    def field(self) -> str:
        return ".".join(self.path)


def config_flags(fields: Iterable[str] | None = None) -> list[ConfigFlag]:
    """The flags of ``fields`` (dotted for a nested model's: ``probe.path``), in that order;
    None: every config field a flag sets, in the config's order."""
    from flockctl.server.config import DeploymentConfig

    every = {flag.field: flag for flag in _flags_of(DeploymentConfig, ())}
    if fields is None:
        return list(every.values())
    unknown = [name for name in fields if name not in every]
    if unknown:
        raise ValueError(f"no config field {unknown[0]!r} has a flag")
    return [every[name] for name in fields]


def flag_names(flags: Iterable[ConfigFlag]) -> dict[str, str]:
    """Each top-level field and how the command line spells it, for error messages: a
    nested model's fields are its flags together (``probe``: ``probe flags``)."""
    return {
        flag.path[0]: flag.option if len(flag.path) == 1 else f"{flag.path[0]} flags"
        for flag in flags
    }


def _flags_of(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterable[ConfigFlag]:
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        marker = flag_of(info)
        if marker is not None:
            yield _make((*prefix, name), info, marker)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _flags_of(info.annotation, (*prefix, name))


def flag_of(info: FieldInfo) -> Flag | None:
    """The ``Flag`` a config field carries, if any."""
    from flockctl.server.flags import Flag

    return next((m for m in info.metadata if isinstance(m, Flag)), None)


def _make(path: tuple[str, ...], info: FieldInfo, marker: Flag) -> ConfigFlag:
    option = marker.option(path[-1])
    kind = str if marker.text else _cli_type(info.annotation)
    decls = [option, *([marker.short] if marker.short else [])]
    described = info.description or ""
    shown = marker.default_text or _default_text(info)
    help_text = f"{described} [default: {shown}]." if shown else f"{described}."
    option_info = typer.Option(
        *decls,
        help=help_text,
        envvar=marker.envvar,
        rich_help_panel=marker.panel,
        show_default=False,
    )
    param = option.removeprefix("--").replace("-", "_")
    return ConfigFlag(path, option, param, Annotated[kind | None, option_info])


def _cli_type(annotation: Any) -> Any:
    """The type the command line reads for a field's type: without None, a Literal's values as
    text (the config names the choices when one is wrong)."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is Literal:
        return str
    return annotation


def _default_text(info: FieldInfo) -> str | None:
    """A field's default as ``--help`` says it; None where there is nothing to say (no value,
    an empty list, a switch that is off)."""
    value = info.get_default(call_default_factory=True)
    if value is None or value is False or value == []:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _given(value: Any) -> Any:
    """A flag's value as the config takes it: None where it was left out (an empty list too)."""
    if isinstance(value, (list, tuple)):
        return list(value) or None
    return value


class ConfigCommand:
    """A command function whose ``flags`` parameter stands for config fields' flags.

    Typer reads ``__signature__``: the function's own parameters with ``flags`` replaced by one
    option per field. A call gets the function's own parameters and ``flags``, the fields'
    values shaped like the config.
    """

    def __init__(self, function: Callable[..., None], fields: Fields) -> None:
        functools.update_wrapper(self, function)
        self._function = function
        self._fields = fields

    @functools.cached_property
    def flags(self) -> list[ConfigFlag]:
        """This command's config flags."""
        return config_flags(self._fields() if callable(self._fields) else self._fields)

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self._function, eval_str=True)
        params: list[inspect.Parameter] = []
        for param in own.parameters.values():
            if param.name != FLAGS_PARAM:
                params.append(param)
                continue
            params += [
                inspect.Parameter(
                    flag.param,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=flag.annotation,
                )
                for flag in self.flags
            ]
        kinds = inspect.Parameter.KEYWORD_ONLY
        return own.replace(parameters=[p.replace(kind=kinds) for p in params])

    def __call__(self, **given: Any) -> None:
        flags: dict[str, Any] = {}
        for flag in self.flags:
            _put(flags, flag.path, _given(given.pop(flag.param)))
        self._function(**given, **{FLAGS_PARAM: flags})


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` in ``tree``; a nested model's dict holds only the flags given, and is None
    when none was."""
    head, *rest = path
    if not rest:
        tree[head] = value
        return
    branch = tree.get(head)
    if value is not None:
        branch = branch or {}
        _put(branch, tuple(rest), value)
    tree[head] = branch


def takes_config_flags(fields: Fields = None) -> Callable[[Callable[..., None]], ConfigCommand]:
    """Make a command function take ``fields`` of the deployment config (None: every field a
    flag sets) as flags, passed to its ``flags`` parameter."""

    def wrap(function: Callable[..., None]) -> ConfigCommand:
        if FLAGS_PARAM not in inspect.signature(function).parameters:
            raise TypeError(f"{function.__name__} has no {FLAGS_PARAM!r} parameter")
        return ConfigCommand(function, fields)

    return wrap
