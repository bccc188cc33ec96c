"""Names of generators, embedders and captioners, and how users plug in their own.

A name in the config (``generator.name`` / ``-sgen``, ``embedder.name`` / ``-cue``,
``prompts.captioner`` / ``-scap``) is one of:

- a built-in name (``Glyph``, ``Latent``, ``HTTP``: the table
  :data:`coautogen_fl.generation.BUILTIN_GENERATORS`, which also says what each needs from the
  config; ``pixels``, ``resnet18``, ``clip``),
- one of the seed project's aliases, mapped to its usual hub id (``StableDiffusion``, ``BlipBase``, ...),
- a hub id (``owner/name``, read from the local cache only) or a local model folder,
- a name another installed package registers under the entry-point group of its kind
  (``coautogen_fl.generators``, ``coautogen_fl.embedders``, ``coautogen_fl.captioners``), or
- ``"pkg.module:Attr"``, imported directly.

A plugged-in object is called as follows (``cfg`` is the whole :class:`~coautogen_fl.config.RunConfig`
for generators and captioners, the ``EmbedderConfig`` for embedders, which sites build too):
if it has ``from_config``, ``obj.from_config(cfg, context)``; otherwise a class is called with the
context as keyword arguments and a function as ``obj(cfg, context)``. ``context`` is a
:class:`~coautogen_fl.generation.base.GeneratorContext` for generators and ``{"device": ...}`` for
embedders and captioners.

Imports go one way: :mod:`coautogen_fl.config` imports this module, which imports the schema
(:mod:`coautogen_fl.schema`) and the light generator table (:mod:`coautogen_fl.generation`), never
the config.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Collection, Protocol, Sequence, runtime_checkable

from .generation import BUILTIN_GENERATORS, GeneratorContext, builtin_requirement
from .hub import first_line, is_path_like
from .schema import CAPTIONER_ALIASES, GENERATOR_ALIASES, ConfigError

if TYPE_CHECKING:
    from .schema import RunConfig

#: Entry-point group of each kind.
GROUPS: dict[str, str] = {
    "generator": "coautogen_fl.generators",
    "embedder": "coautogen_fl.embedders",
    "captioner": "coautogen_fl.captioners",
}

#: Built-in names of each kind (models by hub id / folder come on top for generators and captioners).
#: The generators' entry is a live view of :data:`coautogen_fl.generation.BUILTIN_GENERATORS`.
BUILTIN: dict[str, Collection[str]] = {
    "generator": BUILTIN_GENERATORS.keys(),
    "embedder": ("pixels", "resnet18", "clip"),
    "captioner": (),
}

_CONFIG_KEY = {"generator": "generator.name", "embedder": "embedder.name", "captioner": "prompts.captioner"}
_OBJECT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class RegistryError(ValueError):
    """A name resolves to nothing (or to something that cannot be imported)."""


@dataclass(frozen=True)
class Resolved:
    """What a name stands for: ``kind`` is "builtin", "model" (a hub id or folder) or "plugin"."""

    kind: str
    value: Any


def aliases(kind: str) -> dict[str, str]:
    """The seed project's names of ``kind`` and the hub ids they stand for."""
    return {"generator": GENERATOR_ALIASES, "captioner": CAPTIONER_ALIASES}.get(kind, {})


def is_object_spec(name: str) -> bool:
    """True for ``"pkg.module:Attr"`` (``Attr`` may be dotted)."""
    return bool(_OBJECT_SPEC.match(name))


def load_object(spec: str, key: str) -> Any:
    """Import ``"pkg.module:Attr"`` (``Attr`` may be dotted), naming ``key`` when it fails."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing the module
        raise RegistryError(
            f"{key}={spec!r}: cannot import module '{module_name}' ({first_line(exc, with_type=True)}); "
            "install the package that provides it, or put it on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{key}={spec!r}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def plugins(kind: str) -> dict[str, Any]:
    """Entry points registered for ``kind``, by name (not yet loaded)."""
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def _looks_like_model(name: str) -> bool:
    """A hub id ("owner/name") or a filesystem path."""
    return "/" in name or "\\" in name or name.startswith((".", "~")) or (is_path_like(name) and ":" not in name)


def resolve(kind: str, name: str, load: bool = True) -> Resolved:
    """What ``name`` means for ``kind`` (see the module docstring).

    ``load=False`` checks a plug-in's name without importing it (its value is then the name):
    config validation runs on every site, which need not have the server's generator installed.

    Raises
    ------
    RegistryError
        The name is empty, unknown, or (with ``load``) names an object that cannot be imported.
    """
    key = _CONFIG_KEY[kind]
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{key} must not be empty")
    if name in BUILTIN[kind]:
        return Resolved("builtin", name)
    known = aliases(kind)
    folded = {k.lower(): v for k, v in known.items()}  # the seed's names, any case: StableDiffusion, stablediffusion
    if name.lower() in folded:
        return Resolved("model", folded[name.lower()])
    registered = plugins(kind)
    if name in registered:
        if not load:
            return Resolved("plugin", name)
        try:
            return Resolved("plugin", registered[name].load())
        except Exception as exc:
            raise RegistryError(
                f"{key}={name!r}: entry point {registered[name].value!r} failed to load "
                f"({first_line(exc, with_type=True)})"
            ) from None
    if is_object_spec(name):
        return Resolved("plugin", load_object(name, key) if load else name)
    if kind != "embedder" and _looks_like_model(name):
        return Resolved("model", name)
    options = [*BUILTIN[kind], *known, *registered]
    extra = ", a hub id (owner/name) or a local folder (./models/x)" if kind != "embedder" else ""
    raise RegistryError(
        f"{key}={name!r} is not valid; use one of {', '.join(options) or '(none built in)'}{extra}, "
        f"a name registered under the '{GROUPS[kind]}' entry point, or 'pkg.module:Class'"
    )


@runtime_checkable
class BuiltFromConfig(Protocol):
    """A plug-in that builds itself from the run config and its context (a classmethod)."""

    def from_config(self, cfg: RunConfig, context: Any) -> Any: ...


def call_plugin(obj: Any, cfg: RunConfig, context: GeneratorContext | dict[str, Any]) -> Any:
    """Build a plugged-in component (see the module docstring for the calling convention)."""
    if isinstance(obj, BuiltFromConfig):
        return obj.from_config(cfg, context)
    if isinstance(obj, type):
        kwargs = asdict(context) if isinstance(context, GeneratorContext) else dict(context)
        try:
            return obj(**kwargs)
        except TypeError as exc:
            raise TypeError(
                f"plug-in class {obj.__module__}.{obj.__qualname__} cannot be built from ({', '.join(kwargs)}): {exc}; "
                "accept these keyword arguments or define a from_config(cfg, context) classmethod"
            ) from None
    if callable(obj):
        return obj(cfg, context)
    raise RegistryError(f"plugged-in object {obj!r} is neither a class nor a callable")


def check_names(cfg: RunConfig) -> None:
    """Validate every component name of a config at start-up (raises ``ConfigError``), without
    importing plug-ins (``coautogen run``'s preflight imports them, on the server)."""
    try:
        resolve("generator", cfg.generator.name, load=False)
        resolve("embedder", cfg.embedder.name, load=False)
        if cfg.prompts.captioner:
            resolve("captioner", cfg.prompts.captioner, load=False)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    problem = builtin_requirement(cfg)  # e.g. Glyph needs data.channels=1, Latent generator.model
    if problem:
        raise ConfigError(problem)
    if cfg.prompts.captioner and not cfg.prompts.reference:
        raise ConfigError(
            "prompts.captioner needs prompts.reference: an ImageFolder of public reference images to caption"
        )
    if cfg.postprocess.upscale_on == "rounds" and not cfg.postprocess.upscaler:
        raise ConfigError(
            "postprocess.upscale_on=rounds needs postprocess.upscaler (a diffusers pipeline folder or hub id)"
        )


def names(kind: str) -> Sequence[str]:
    """Every name of ``kind`` usable without a path or hub id (for help texts)."""
    return [*BUILTIN[kind], *aliases(kind), *plugins(kind)]
