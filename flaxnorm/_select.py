"""Paths and leaf selection in parameter pytrees, for ``flaxnorm.tree``.

A path is the tuple of keys from the root to a leaf: ``str`` for dict keys and
attributes, ``int`` for sequence positions. A selector is leaf names, a
regular expression searched in the path joined by ``/``, or a predicate
``(path, leaf) -> bool``; :class:`Selection` applies one to a pytree and
explains, when some name matched nothing, which leaves exist. The Linen and
NNX faces select a layer's params with :class:`ParamSelector` (a regular
expression or a predicate) or with plain names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax.core import FrozenDict, meta

from flaxnorm import _checks, _fold

Path = tuple[Any, ...]
#: Which leaves a transform touches: leaf names, a regular expression over the
#: ``/``-joined path, or a ``(path, leaf) -> bool`` predicate.
Selector = str | Sequence[str] | re.Pattern[str] | Callable[[Path, Any], bool]


@dataclasses.dataclass(frozen=True)
class ParamSelector:
  """Selects params by their path below the wrapped module (hashable: a class key).

  Exactly one of ``pattern`` (searched in the path joined by ``/``, e.g.
  ``"Dense_0/kernel"``) and ``predicate`` (called as ``predicate(path, param)``
  with ``param`` an array or ``jax.ShapeDtypeStruct``) is set.
  """

  pattern: re.Pattern[str] | None = None
  predicate: Callable[[Path, Any], Any] | None = None

  def matches(self, path: Path, param: Callable[[], Any]) -> bool:
    """Whether the param at ``path`` is selected; ``param()`` gives it (or its shape)."""
    if self.pattern is not None:
      return self.pattern.search("/".join(str(p) for p in path)) is not None
    assert self.predicate is not None
    return bool(self.predicate(path, param()))

  def __repr__(self) -> str:
    return f"re.compile({self.pattern.pattern!r})" if self.pattern else repr(self.predicate)


def parse_names(name: Any, argname: str = "name") -> tuple[str, ...] | ParamSelector:
  """``name`` as a tuple of param names, or a :class:`ParamSelector` for a regex or predicate."""
  if isinstance(name, re.Pattern):
    return ParamSelector(pattern=name)
  if callable(name) and not isinstance(name, str):
    return ParamSelector(predicate=name)
  return _checks.check_names(name, argname, selectors=True)


def key(k: Any) -> Any:
  """A jax key-path entry as the plain key: dict key, attribute name or index."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def path_str(path: Path) -> str:
  return "/".join(str(p) for p in path) or _fold.TOP


def is_box(x: Any) -> bool:
  return isinstance(x, meta.AxisMetadata)


def is_leaf(x: Any) -> bool:
  return is_box(x) or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def is_array(x: Any) -> bool:
  return x is not None and not is_box(x) and is_leaf(x) and hasattr(x, "dtype")


def leaves(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` pairs; boxes are leaves, and so is whatever ``is_leaf`` accepts."""
  stop = is_box if is_leaf is None else (lambda x: is_box(x) or is_leaf(x))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)
  return [(tuple(key(k) for k in p), x) for p, x in flat]


def children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
  """One level of a pytree node: ``[(key, child)], treedef``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  return [(key(p[0]), x) for p, x in flat], treedef


def rebuild(node: Mapping, items: dict) -> Mapping:
  if isinstance(node, FrozenDict):
    return FrozenDict(items)
  return items if type(node) is dict else type(node)(items)  # type: ignore[call-arg]


class Selection:
  """Which leaves ``names`` picks, and the error when some name picks none."""

  def __init__(self, names: Selector, method: str, argname: str = "name"):
    self.method, self.argname = method, argname
    if isinstance(names, re.Pattern):
      pattern = names
      self.predicate, self.names = (lambda p, _: pattern.search(path_str(p)) is not None), None
      self.kind = f"the path pattern {pattern.pattern!r}"
    elif callable(names) and not isinstance(names, str):
      self.predicate, self.names = names, None
      self.kind = "the path predicate"
    else:
      self.predicate, self.names = None, _checks.check_names(names, argname, selectors=True)
    self.hits: list[Path] = []

  def __call__(self, path: Path, x: Any) -> bool:
    if self.names is not None:
      hit = x is not None and bool(path) and isinstance(path[-1], str) and path[-1] in self.names
      if hit and not is_array(x):
        hint = " Unbox it first: flax.core.meta.unbox(params)." if is_box(x) else ""
        raise TypeError(
          f"{self.method}: the leaf at '{path_str(path)}' is a {type(x).__name__}, not an "
          f"array.{hint}"
        )
    else:
      assert self.predicate is not None
      hit = is_array(x) and bool(self.predicate(path, x))
    if hit:
      if not path:
        raise ValueError(
          f"{self.method}: params is a single array; put it in a dict (e.g. "
          "{'kernel': w}) so its state has a name."
        )
      self.hits.append(path)
    return hit

  def check_all_found(self, params: Any) -> None:
    found = {p[-1] for p in self.hits}
    missing = [n for n in self.names if n not in found] if self.names else []
    if self.hits and not missing:
      return
    what = f"{self.argname} {missing}" if self.names else self.kind
    paths = [path_str(p) for p, x in leaves(params) if is_array(x) or is_box(x)]
    hint = ""
    if any(is_box(x) for _, x in leaves(params)):
      hint = " The tree holds boxed leaves: unbox it first (flax.core.meta.unbox)."
    if self.method == "weight_norm_init" and any(str(p).endswith("_g") for p in paths):
      hint += " Leaves ending in '_g' exist: was weight_norm_init applied already?"
    if is_array(params):
      hint += " params is a single array; put it in a dict (e.g. {'kernel': w})."
    raise ValueError(f"{self.method}: {what} matched no array leaf. The leaves are {paths}.{hint}")
