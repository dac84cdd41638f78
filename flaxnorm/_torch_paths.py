"""PyTorch module paths -> Flax paths, following the Flax tree.

A PyTorch index (``ups.0``) has one spelling in PyTorch but four in Flax: a
Linen list attribute made in ``setup`` is ``ups_0``, an ``nn.Sequential``'s
layer is ``ups/layers_0``, an NNX list's is ``ups/0`` and an ``nnx.Sequential``'s
is ``ups/layers/0``. :func:`resolve` tries every spelling against the Flax
params tree and keeps the ones that exist; more than one is an error that
lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

KeyMap = Callable[[str], "str | tuple[str, ...] | None"] | Mapping[str, str] | None

Path = tuple[str, ...]

_WHERE = "load_torch_state_dict"


def _steps(parts: tuple[str, ...]) -> list[tuple[Path, tuple[str, ...]]]:
  """The Flax names the head of ``parts`` may be, each with the PyTorch parts left."""
  head, rest = parts[0], parts[1:]
  if head.isdigit():  # Linen nn.Sequential, an NNX list, NNX nnx.Sequential
    return [((f"layers_{head}",), rest), ((head,), rest), (("layers", head), rest)]
  steps: list[tuple[Path, tuple[str, ...]]] = []
  n = next((i for i, p in enumerate(rest) if not p.isdigit()), len(rest))
  for j in range(n, 0, -1):  # a Linen list of lists: blocks.0.1 -> blocks_0_1
    steps.append((("_".join((head, *rest[:j])),), rest[j:]))
  steps.append(((head,), rest))
  return steps


def spellings(parts: tuple[str, ...], tree: Any = None) -> Iterator[Path]:
  """The Flax paths PyTorch path ``parts`` may be; only those in ``tree`` unless it is ``None``.

  ``("ups", "0")`` -> ``ups_0``, ``ups/layers_0``, ``ups/0``, ``ups/layers/0``
  (``("blocks", "0", "1")`` also ``blocks_0_1``, a Linen list of lists);
  a bare index is ``layers_0``, ``0`` or ``layers/0`` (an ``nnx.Sequential``);
  other names are kept.
  """
  if not parts:
    yield ()
    return
  for names, remaining in _steps(parts):
    sub = tree
    if tree is not None:
      sub = _get(tree, names)
      if sub is None:
        continue
    for tail in spellings(remaining, sub):
      yield (*names, *tail)


def _split(path: str) -> Path:
  return tuple(p for p in path.split("/") if p)


def _get(tree: Any, path: Path) -> Any:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree if isinstance(tree, Mapping) else None


def _follow(params: Mapping[str, Any], base: Path, rest: str, prefix: str) -> Path | str:
  """The one Flax path under ``base`` that PyTorch path ``rest`` spells, or why there is none."""
  node = _get(params, base)
  shown = "/".join(base) or "the root"
  if node is None:
    return f"no Flax layer at 'params/{'/'.join(base)}'"
  parts = tuple(rest.split(".")) if rest else ()
  found = list(dict.fromkeys(spellings(parts, node)))
  if len(found) > 1:
    raise ValueError(
      f"{_WHERE}: PyTorch layer '{prefix}' matches several Flax layers under {shown}: "
      + ", ".join(f"'params/{'/'.join((*base, *p))}'" for p in found)
      + "; pass key_map={'"
      + prefix
      + "': 'flax/path'} to choose one."
    )
  if not found:
    tried = list(dict.fromkeys(spellings(parts)))
    return (
      "no Flax layer for it; tried "
      + ", ".join(f"'params/{'/'.join((*base, *p))}'" for p in tried)
      + " (key_map maps PyTorch prefixes to Flax paths)"
    )
  return (*base, *found[0])


def resolve(key_map: KeyMap, prefix: str, params: Mapping[str, Any]) -> Path | str | None:
  """The Flax path ``key_map`` gives PyTorch layer ``prefix`` in ``params``.

  Args:
    key_map: ``None`` (follow the tree from its root), a dict of PyTorch
      prefixes -> Flax paths (the longest ``.``-bounded match wins, the rest
      follows the tree), or a function of the prefix.
    prefix: the PyTorch layer, e.g. ``"resblocks.0.convs1.2"``.
    params: the Flax params tree.

  Returns:
    The path; ``None`` when ``key_map`` skips the layer; or a string saying
    why no Flax layer fits (the names tried).

  Raises:
    ValueError: several Flax layers fit (they are listed).
    TypeError: a ``key_map`` of the wrong type, or a function giving one.
  """
  if key_map is None:
    return _follow(params, (), prefix, prefix)
  if isinstance(key_map, Mapping):
    if prefix in key_map:
      return _split(key_map[prefix])
    hits = [p for p in key_map if p == "" or prefix.startswith(p + ".")]
    if not hits:
      return None
    best = max(hits, key=len)
    return _follow(
      params, _split(key_map[best]), prefix[len(best) + 1 :] if best else prefix, prefix
    )
  if not callable(key_map):
    raise TypeError(
      f"{_WHERE}: key_map must be a function, a dict of prefixes or None, "
      f"got {type(key_map).__name__}."
    )
  path = key_map(prefix)
  if path is None:
    return None
  if isinstance(path, str):
    return _split(path)
  if isinstance(path, tuple) and all(isinstance(p, str) for p in path):
    return path
  raise TypeError(
    f"{_WHERE}: key_map gave {path!r} for '{prefix}'; expected a "
    "'a/b' string, a tuple of names or None."
  )


def unindexed(
  key_map: KeyMap, prefix: str, params: Mapping[str, Any]
) -> Iterator[tuple[Path, int]]:
  """The Flax paths ``prefix`` names without one of its indices, each with that index.

  ``"layers.3.fc"`` -> ``(path of "layers.fc", 3)``: where no Flax layer spells
  the index, the prefix may name a member of a stacked layer (``nn.scan``,
  ``nn.vmap``); the caller checks the leading axis. Only paths that exist.
  """
  parts = prefix.split(".")
  for j, part in enumerate(parts):
    if part.isdigit():
      path = resolve(key_map, ".".join(parts[:j] + parts[j + 1 :]), params)
      if isinstance(path, tuple) and _get(params, path) is not None:
        yield path, int(part)


def torch_prefix(
  path: Path,
  params: Mapping[str, Any] | None = None,
  sequential: Collection[Path] | None = None,
  nnx: bool = False,
) -> str:
  """The PyTorch prefix of a Flax path.

  Args:
    path: the Flax path, e.g. ``("ups_0",)``.
    params: the params tree the path is in; ``None``: every ``name_N`` is a
      list element.
    sequential: the paths of the Sequential modules (``None``: every
      ``layers_N``/``layers/N`` is a Sequential's layer).
    nnx: whether the path is an NNX module's.

  Returns:
    The prefix: a Sequential's layer (Linen ``layers_0``, NNX ``layers/0``) is
    its index ``0``; an NNX list element ``ups/0`` is ``ups.0`` and NNX names
    are kept whole (``conv_1``); a Linen ``ups_0`` is the list element
    ``ups.0`` when the tree has ``ups_0`` beside it (lists count from 0),
    else a name kept whole (``conv_1``); ``blocks_0_1`` is ``blocks.0.1``
    when the tree has ``blocks_0_0``.
  """
  out: list[str] = []
  for i, part in enumerate(path):
    parent, node = path[:i], None if params is None else _get(params, path[:i])
    in_seq = sequential is None or parent in sequential
    match = re.fullmatch(r"(.+?)((?:_\d+)+)", part)  # name_0, or name_0_1 (a list of lists)
    index = match.group(2)[1:].split("_") if match else []
    if nnx:
      if not (part == "layers" and in_seq and i + 1 < len(path) and path[i + 1].isdigit()):
        out.append(part)
    elif match and match.group(1) == "layers" and in_seq and len(index) == 1:
      out.append(index[0])
    elif match and (node is None or match.group(1) + "_0" * len(index) in node):
      out += [match.group(1), *index]
    else:
      out.append(part)
  return ".".join(out)
