"""The normalized subclass of a layer's class, shared by the Linen and NNX faces.

Both faces normalize a layer by giving it a subclass of its own class whose
methods read the transforms' specs from the class (``_flaxnorm_specs``, a
mapping from param name to that face's spec) — no closures. This module builds
those subclasses: it merges specs (refusing to wrap a param twice), keeps the
base's name, module and qualname (Flax auto-names submodules after the class,
and users see their layer's class in reprs), writes the docstring, caches one
class per (base, specs), and makes instances and the classes themselves (an
NNX ``GraphDef`` holds the class) pickle by rebuilding the class from
``(base, specs)``, since pickle looks classes up by name and would find the
base. What goes into the class body is the face's business (its
``namespace`` function).
"""

from __future__ import annotations

import copyreg
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol

#: ``namespace(base, specs) -> (class body, class keywords)``, one per face.
Namespace = Callable[[type, Mapping[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


class Spec(Protocol):
  """What every face's spec has: the name of the transform that made it."""

  @property
  def method(self) -> str: ...


class SpecBase:
  """Base of the faces' specs: the transform's options and what they imply.

  A face's spec is a frozen dataclass with an ``options`` field (a
  ``flaxnorm._options`` value) and the face's own behaviour.
  """

  options: Any

  @property
  def method(self) -> str:
    """The public transform's name, ``"weight_norm"`` or ``"spectral_norm"``."""
    return self.options.method

  @property
  def recursive(self) -> bool:
    """Whether the transform also reaches the params of the layer's submodules (Linen)."""
    return self.options.recursive


_CACHE: dict[tuple[Any, ...], type] = {}


def base_of(cls: type) -> type:
  """The layer class a normalized class was made from (``cls`` itself if plain)."""
  return cls.__dict__.get("_flaxnorm_base", cls)


def specs_of(cls: type) -> dict[str, Any]:
  """The specs a (normalized) class carries, by param name (or selector); empty if plain."""
  return dict(getattr(cls, "_flaxnorm_specs", {}))


def merge(cls: type, specs: Mapping[str, Spec]) -> dict[str, Any]:
  """``cls``'s specs plus ``specs``; a param already wrapped is a ``ValueError``."""
  merged = specs_of(cls)
  for name, spec in specs.items():
    if name in merged:
      raise ValueError(
        f"{spec.method}: param '{name}' of {base_of(cls).__name__} is already wrapped by "
        f"{merged[name].method}; a param can be normalized only once."
      )
    merged[name] = spec
  return merged


def normalized_class(base: type, specs: Mapping[str, Spec], namespace: Namespace) -> type:
  """The cached subclass of ``base`` that normalizes ``specs``' params (``base`` if none).

  Args:
    base: the plain layer class.
    specs: param name -> the face's spec.
    namespace: the face's class body builder (a module-level function, so
      that pickled instances can rebuild the class).

  Returns:
    A subclass of ``base`` with ``base``'s name, qualname and module, and the
    class attributes ``_flaxnorm_base`` and ``_flaxnorm_specs``.
  """
  if not specs:
    return base
  items = tuple(sorted(specs.items(), key=lambda kv: repr(kv[0])))
  key = (base, items, namespace)
  if key in _CACHE:
    return _CACHE[key]
  body, kwds = namespace(base, dict(items))
  body.update(
    _flaxnorm_base=base,
    _flaxnorm_specs=types.MappingProxyType(dict(items)),
    # Static: Flax would wrap a plain function as a module method.
    _flaxnorm_namespace=staticmethod(namespace),
    _flaxnorm_rebuild=classmethod(_rebuild),
    __reduce_ex__=_reduce_ex,
    __doc__=f"{base.__name__} with "
    + ", ".join(f"{s.method}({n!r})" for n, s in items)
    + f".\n\n{base.__doc__ or ''}",
  )
  cls = _CACHE[key] = subclass(base, body, kwds)
  return cls


def subclass(base: type, body: Mapping[str, Any], kwds: Mapping[str, Any]) -> type:
  """A subclass of ``base`` with its name, module and qualname, pickled by rebuilding.

  ``body`` holds ``_flaxnorm_rebuild`` (see :func:`pickling_meta`); ``kwds``
  are the class keywords (NNX's ``pytree=``).
  """
  body = {**body, "__module__": base.__module__, "__qualname__": base.__qualname__}
  kwds = {**kwds, "metaclass": pickling_meta(type(base))}
  return types.new_class(base.__name__, (base,), kwds, lambda ns: ns.update(body))


_METAS: dict[type, type] = {}


def pickling_meta(meta: type) -> type:
  """A subclass of the metaclass ``meta`` whose classes pickle by rebuilding (see module doc).

  A class made with it rebuilds from ``cls._flaxnorm_rebuild()``, a
  ``(function, args)`` pair of its own class dict (a normalized class's is
  ``normalized_class`` and its arguments). The ``copyreg`` entry is for this
  subclass only: no other class's pickling changes.
  """
  if meta not in _METAS:
    sub = type(meta.__name__, (meta,), {"__module__": meta.__module__})
    copyreg.pickle(sub, _reduce_class)
    _METAS[meta] = sub
  return _METAS[meta]


def _reduce_class(cls: Any) -> str | tuple[Any, ...]:
  if "_flaxnorm_rebuild" not in cls.__dict__:  # a user's subclass of a made class
    return cls.__qualname__  # pickled by name, as any class
  return cls._flaxnorm_rebuild()


def _rebuild(cls: Any) -> tuple[Any, ...]:
  return normalized_class, (base_of(cls), specs_of(cls), cls._flaxnorm_namespace)


def _reduce_ex(self: Any, protocol: Any) -> tuple[Any, ...]:
  cls = type(self)
  args = (cls._flaxnorm_base, tuple(cls._flaxnorm_specs.items()), cls._flaxnorm_namespace)
  return (_unpickle, args, *object.__reduce_ex__(self, protocol)[2:])


def _unpickle(base: type, items: tuple[Any, ...], namespace: Namespace) -> Any:
  """An empty instance of the normalized class; pickle then restores its ``__dict__``."""
  return object.__new__(normalized_class(base, dict(items), namespace))
