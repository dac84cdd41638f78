"""Griffe extension: the reST spellings in flaxnorm's docstrings, as Markdown.

The docstrings are Google style with a little reST: Sphinx roles
(:func:`from_torch`), literal blocks introduced by ``::``, and escaped
spaces (``nnx.Param``\\ s). This turns them into mkdocstrings cross-references,
fenced code blocks and plain text when the docs are built; the source is not
changed. A role whose target cannot be found is left as inline code.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|data|meth|attr|mod|obj|exc|const):`~?([\w.]+)`")


def _target(obj: griffe.Object, name: str) -> str | None:
  """The full path of ``name`` as seen from ``obj`` (its own scope first, then outwards)."""
  if name.startswith("flaxnorm"):
    return name
  head, _, rest = name.partition(".")
  scope: Any = obj
  while scope is not None:
    if head in getattr(scope, "members", {}):
      return f"{scope.path}.{head}" + (f".{rest}" if rest else "")
    scope = scope.parent
  return None


def _roles(obj: griffe.Object, text: str) -> str:
  def repl(m: re.Match) -> str:
    name = m.group(1)
    target = _target(obj, name)
    return f"[`{name}`][{target}]" if target else f"`{name}`"

  return _ROLE.sub(repl, text)


def _literal_blocks(text: str) -> str:
  """``text::`` + blank line + indented block -> ``text:`` + a fenced block."""
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
      indent = len(line) - len(line.lstrip())
      j = i + 2
      block: list[str] = []
      while j < len(lines) and (
        not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
      ):
        block.append(lines[j])
        j += 1
      while block and not block[-1].strip():
        block.pop()
      if block:
        head = line.rstrip()[:-2].rstrip()
        out.append(head + ":" if head.strip() else "")
        pad = " " * indent
        out += ["", pad + "```text"]
        out += [pad + b if b.strip() else "" for b in textwrap.dedent("\n".join(block)).split("\n")]
        out += [pad + "```", ""]
        i = j
        continue
    out.append(line)
    i += 1
  return "\n".join(out)


def convert(obj: griffe.Object, text: str) -> str:
  text = text.replace("\\ ", "")
  return _literal_blocks(_roles(obj, text))


def _walk(obj: griffe.Object, seen: set[int]) -> None:
  if id(obj) in seen:
    return
  seen.add(id(obj))
  if obj.docstring is not None:
    obj.docstring.value = convert(obj, obj.docstring.value)
  for member in obj.members.values():
    if not member.is_alias:
      _walk(member, seen)


class RstToMarkdown(griffe.Extension):
  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # griffe >= 2
    _walk(pkg, set())

  def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # griffe 1
    _walk(pkg, set())
