"""Loading a latent generator's torch module from one file, in one of three formats: a
TorchScript archive, a state dict plus a factory that builds the module, or (only when trusted) a
whole pickled module; and reading what the module is (latent size, class conditioning).

``torch`` is imported inside the functions; importing it costs a second.
"""

from __future__ import annotations

import inspect
import numbers
import os
import warnings
import zipfile
from typing import Any, Sequence

from coautogen_fl.generation.base import GeneratorLoadError
from coautogen_fl.hub import check_device, first_line, joined_lines
from coautogen_fl.registry import RegistryError, is_object_spec, load_object

#: The operations ``vary`` picks from (uniformly, among those possible for a parent).
OPERATIONS = ("perturb", "interpolate", "direction")

#: Keys every genotype of this generator holds ("op" is "sample" or one of ``OPERATIONS``;
#: "batch"/"slot" say where in a forward batch the image was rendered, see ``regenerate``).
GENOTYPE_KEYS = ("model", "op", "z", "label", "batch", "slot")

#: Module attributes read (in this order) for the latent size when ``latent_dim`` is 0.
LATENT_ATTRIBUTES = ("latent_dim", "z_dim", "nz")

#: Module attributes read for the number of classes a conditional G knows (checked if present).
CLASS_ATTRIBUTES = ("num_classes", "n_classes")

#: Names of a second forward argument that mean "class labels" even when it has a default.
_LABEL_ARGUMENTS = frozenset(
    {
        "y",
        "c",
        "label",
        "labels",
        "cls",
        "class_",
        "classes",
        "class_label",
        "class_labels",
        "class_idx",
        "class_ids",
        "target",
        "targets",
        "cond",
        "condition",
    }
)


_PICKLE_WARNING = (
    "loading '{path}' as a whole pickled module (generator.trust_pickle=true): unpickling executes "
    "code stored in the file; only load files you trust"
)


# -- loading ------------------------------------------------------------------------------------


def _file_kind(path: str) -> str:
    """ "torchscript", "torch" (torch.save zip or legacy pickle) or "unknown", from the content."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        inner = [name.split("/", 1)[1] for name in names if "/" in name]
        if any(n.startswith("code/") or n == "constants.pkl" for n in inner):
            return "torchscript"
        if "data.pkl" in inner:
            return "torch"
        return "unknown"
    with open(path, "rb") as handle:
        head = handle.read(2)
    # Pickle protocol 2+ starts with PROTO (0x80) and the protocol number (torch's legacy format).
    return "torch" if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 else "unknown"


def _build_from_factory(factory: str, path: str) -> Any:
    """Import and call ``factory`` ("package.module:callable"); the module it returns."""
    from torch import nn

    if not factory:
        raise GeneratorLoadError(
            f"'{path}' holds a state dict, which needs the code of its module: set generator.factory to "
            "'package.module:callable' (a function without arguments that builds the module), or save the "
            "generator as TorchScript (torch.jit.script(G).save(path))"
        )
    if not is_object_spec(factory):
        raise GeneratorLoadError(
            f"generator.factory '{factory}' is not of the form 'package.module:callable' "
            "(e.g. 'mypackage.models:build_generator')"
        )
    try:
        target = load_object(factory, "generator.factory")
    except RegistryError as exc:
        raise GeneratorLoadError(str(exc)) from None
    if not callable(target):
        raise GeneratorLoadError(
            f"generator.factory '{factory}' is not callable ({type(target).__name__}); name a function or class "
            "that builds the module without arguments"
        )
    try:
        module = target()
    except Exception as exc:
        raise GeneratorLoadError(
            f"generator.factory '{factory}' failed when called without arguments: {first_line(exc, with_type=True)}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise GeneratorLoadError(
            f"generator.factory '{factory}' returned {type(module).__name__}, not a torch.nn.Module"
        )
    return module


def _load_state_dict(module: Any, state: Any, factory: str, path: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error on any mismatch."""
    expected = set(module.state_dict().keys())
    given = set(state.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise GeneratorLoadError(
            f"the state dict in '{path}' does not match the module built by generator.factory '{factory}': "
            f"{'; '.join(parts)}; check generator.factory and generator.model belong together"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # e.g. size mismatches
        raise GeneratorLoadError(
            f"the state dict in '{path}' does not fit the module built by generator.factory '{factory}': "
            f"{joined_lines(exc)}"
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_latent_module(path: str, factory: str = "", trust_pickle: bool = False, device: str = "cpu") -> Any:
    """Load a latent generator module G from one file, without network access.

    Formats, recognised by content (any file name):

    - a TorchScript archive (``torch.jit.script(G).save(path)`` or ``torch.jit.trace``): loaded
      with ``torch.jit.load``; needs no code. Traced modules keep no Python attributes, so give
      ``latent_dim`` to :class:`LatentGenerator`.
    - a state dict (``torch.save(G.state_dict(), path)``): loaded with ``weights_only=True`` into
      the module ``factory`` builds (``"package.module:callable"``, called without arguments),
      ``strict=True``.
    - a whole pickled module (``torch.save(G, path)``): only with ``trust_pickle=True``, since
      unpickling executes code from the file (a ``UserWarning`` says so).

    Parameters
    ----------
    path : str
        The file (config key ``generator.model``).
    factory : str, default ""
        ``"package.module:callable"`` building the module for a state dict (``generator.factory``).
    trust_pickle : bool, default False
        Allow loading a whole pickled module (``generator.trust_pickle``).
    device : str, default "cpu"
        torch device the module is moved to.

    Returns
    -------
    torch.nn.Module
        The module in ``eval()`` mode on ``device``.

    Raises
    ------
    GeneratorLoadError
        One line naming the config key to fix: a missing file, a state dict without (or with a
        bad, unimportable or non-callable) factory or with keys that do not match its module, a
        pickle without ``trust_pickle``, or a file that is none of the three formats.
    """
    check_device(device, GeneratorLoadError)
    path = os.path.expanduser(str(path))
    if not path or not os.path.isfile(path):
        what = "is a folder, not a file" if path and os.path.isdir(path) else "does not exist"
        raise GeneratorLoadError(
            f"latent generator file '{path}' {what}: set generator.model to a TorchScript file, a state dict "
            "(with generator.factory) or, trusted, a pickled module"
        )
    import torch

    kind = _file_kind(path)
    if kind == "unknown":
        raise GeneratorLoadError(
            f"'{path}' is neither a TorchScript archive, a torch.save state dict nor a pickled module: set "
            "generator.model to a file saved with torch.jit.save / torch.save"
        )
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():  # newer torch marks TorchScript deprecated
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(path, map_location=device)
        except Exception as exc:
            raise GeneratorLoadError(
                f"TorchScript file '{path}' (generator.model) could not be loaded: {first_line(exc, with_type=True)}"
            ) from exc
        return module.eval()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" not in str(exc):
            raise GeneratorLoadError(
                f"'{path}' (generator.model) is not a readable torch file: {first_line(exc, with_type=True)}"
            ) from exc
        if not trust_pickle:
            raise GeneratorLoadError(
                f"'{path}' holds pickled Python objects (e.g. a whole module), and unpickling executes code: set "
                "generator.trust_pickle=true only for a file you trust, or save a state dict (+ generator.factory) "
                "or TorchScript instead"
            ) from None
        warnings.warn(_PICKLE_WARNING.format(path=path), UserWarning, stacklevel=2)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise GeneratorLoadError(
                f"pickled file '{path}' (generator.model) could not be loaded: {first_line(exc2, with_type=True)}"
            ) from exc2
    if isinstance(obj, torch.nn.Module):
        module = obj
    elif _is_state_dict(obj):
        module = _build_from_factory(factory, path)
        _load_state_dict(module, obj, factory, path)
    elif isinstance(obj, dict):
        keys = sorted(str(k) for k in obj)[:8]
        raise GeneratorLoadError(
            f"'{path}' holds a dict that is not a state dict (keys {keys}, not all tensors), e.g. a training "
            "checkpoint: set generator.model to a file holding only the generator's state_dict()"
        )
    else:
        raise GeneratorLoadError(
            f"'{path}' holds a {type(obj).__name__}, not a module or a state dict: set generator.model to a "
            "TorchScript file, a state dict (with generator.factory) or a pickled module"
        )
    return module.to(device).eval()


# -- introspection ------------------------------------------------------------------------------


def _module_int(module: Any, names: Sequence[str]) -> int | None:
    """The first positive int attribute of ``module`` among ``names``."""
    for name in names:
        try:
            value = getattr(module, name)
        except Exception:  # TorchScript modules raise RuntimeError for unknown attributes
            continue
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
            return int(value)
    return None


def takes_labels(module: Any) -> bool:
    """Whether ``module.forward`` takes class labels as its second argument.

    True when forward has a second positional parameter that is required, defaults to None, or
    is named like labels (``y``, ``labels``, ``class_labels``, ...). TorchScript modules are read
    through ``module.forward.schema``; a forward of ``*args`` counts as unconditional.
    """
    forward = getattr(module, "forward", None)
    schema = getattr(forward, "schema", None)
    if schema is not None:
        arguments = [a for a in schema.arguments if a.name != "self" and not getattr(a, "kwarg_only", False)]
        if len(arguments) < 2:
            return False
        second = arguments[1]
        if not second.has_default_value() or second.default_value is None:
            return True
        return second.name in _LABEL_ARGUMENTS
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < 2:
        return False
    second = positional[1]
    return second.default is inspect.Parameter.empty or second.default is None or second.name in _LABEL_ARGUMENTS
