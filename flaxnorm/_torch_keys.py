"""PyTorch state-dict key styles: which keys a layer has, and what they hold.

Keys are relative to the layer. Each (method, style) has a key set that maps a
role to a key: ``w`` (the weight), ``g``/``v`` (weight norm's magnitude and
direction), ``u``/``sv`` (spectral norm's left and right vectors, as PyTorch
names them). The table is in ``flaxnorm.interop``'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Collection

STYLES = ("parametrizations", "legacy")

PREFIX = "parametrizations.weight."

# Role -> key, per (method, style); "plain" is the style of an unnormalized weight.
KEYSETS: dict[tuple[str | None, str], dict[str, str]] = {
  (None, "plain"): {"w": "weight"},
  ("weight_norm", "legacy"): {"g": "weight_g", "v": "weight_v"},
  ("weight_norm", "parametrizations"): {"g": PREFIX + "original0", "v": PREFIX + "original1"},
  ("spectral_norm", "legacy"): {"w": "weight_orig", "u": "weight_u", "sv": "weight_v"},
  ("spectral_norm", "parametrizations"): {
    "w": PREFIX + "original",
    "u": PREFIX + "0._u",
    "sv": PREFIX + "0._v",
  },
}
# PyTorch < 1.1 spectral norm: no ``weight_v``, the normalized weight stored as a buffer
# (``w_sn``); PyTorch's load hook recovers ``v`` from it (``_torch_convert``).
PRE_1_1 = {"w": "weight_orig", "u": "weight_u", "w_sn": "weight"}
_LEGACY = ("weight_g", "weight_v", "weight_orig", "weight_u")
# Longest first, so that a key's suffix is matched before a shorter one it ends with.
_WEIGHT_KEYS = tuple(sorted({k for ks in KEYSETS.values() for k in ks.values()}, key=len))[::-1]
LAYER_KEYS = (*_WEIGHT_KEYS, "bias")


def check_style(style: object, where: str) -> None:
  """Raises ``ValueError`` unless ``style`` is one of :data:`STYLES`."""
  if style not in STYLES:
    raise ValueError(f"{where}: unknown style {style!r}; expected one of {list(STYLES)}.")


def keys_for(method: str | None, style: str) -> dict[str, str]:
  """Role -> key written for ``method`` in ``style`` (a plain weight has one style)."""
  return KEYSETS[(method, "plain" if method is None else style)]


def detect(keys: Collection[str], where: str) -> tuple[str | None, str, dict[str, str]]:
  """The method, style and key set of one layer's keys.

  Args:
    keys: the layer's keys, e.g. ``["weight_g", "weight_v", "bias"]``.
    where: the caller, for messages.

  Returns:
    ``(method, style, roles)``: ``method`` is ``"weight_norm"``,
    ``"spectral_norm"`` or ``None``; ``style`` is ``"legacy"``,
    ``"parametrizations"`` or ``"plain"``; ``roles`` maps role -> key. A
    spectral-norm layer saved by PyTorch < 1.1 (``weight_orig``, ``weight_u``
    and the normalized ``weight``, no ``weight_v``) is ``"legacy"`` with
    roles ``w``, ``u`` and ``w_sn``.

  Raises:
    ValueError: unknown keys, keys of several styles or of both methods, no
      weight, or missing keys of the detected set (all keys are named).
  """
  unknown = sorted(set(keys) - set(LAYER_KEYS))
  if unknown:
    raise ValueError(
      f"{where}: unexpected keys {unknown} (found {sorted(keys)}); a layer has 'bias' "
      f"and the keys of one PyTorch style: {[sorted(ks.values()) for ks in KEYSETS.values()]}."
    )
  if set(PRE_1_1.values()) <= set(keys) <= {*PRE_1_1.values(), "bias"}:
    return "spectral_norm", "legacy", dict(PRE_1_1)
  style, found = _style(keys, where)
  method = _method(style, found, where)
  roles = KEYSETS[(method, style)]
  missing = sorted(set(roles.values()) - set(found))
  if missing:
    raise ValueError(
      f"{where}: missing keys {missing} for a {style} {method or 'plain weight'} layer; "
      f"found {sorted(keys)}."
    )
  return method, style, roles


def _style(keys: Collection[str], where: str) -> tuple[str, list[str]]:
  """The one style of the weight keys, and those keys; raises if none or several."""
  groups = {
    "plain ('weight')": [x for x in keys if x == "weight"],
    "legacy (weight_g/weight_v/weight_orig/weight_u)": [x for x in keys if x in _LEGACY],
    "parametrizations (parametrizations.weight.*)": [x for x in keys if x.startswith(PREFIX)],
  }
  present = {g: ks for g, ks in groups.items() if ks}
  if len(present) > 1:
    raise ValueError(
      f"{where}: keys mix PyTorch styles: "
      + "; ".join(f"{g}: {sorted(ks)}" for g, ks in present.items())
      + ". A layer's keys come from one style; convert each state dict separately."
    )
  if not present:
    raise ValueError(
      f"{where}: no weight found among keys {sorted(keys)}; expected 'weight', "
      "'weight_g'/'weight_v', 'weight_orig'/'weight_u'/'weight_v' or "
      "'parametrizations.weight.*'."
    )
  found = next(iter(present.values()))
  if "weight" in keys:
    return "plain", found
  return ("legacy" if found[0] in _LEGACY else "parametrizations"), found


def _method(style: str, found: list[str], where: str) -> str | None:
  """The method whose key set (of ``style``) overlaps ``found`` most; raises if both are there."""
  candidates = [ms for ms in KEYSETS if ms[1] == style]
  # Most overlap wins: weight_v alone is shared by both legacy sets.
  best = max(candidates, key=lambda ms: len(set(KEYSETS[ms].values()) & set(found)))
  if len(candidates) == 2:
    other = next(c for c in candidates if c != best)
    own = set(KEYSETS[best].values()) - set(KEYSETS[other].values())
    theirs = set(KEYSETS[other].values()) - set(KEYSETS[best].values())
    if set(found) & theirs:
      raise ValueError(
        f"{where}: keys {sorted(found)} mix weight norm and spectral norm "
        f"({sorted(set(found) & own)} vs {sorted(set(found) & theirs)})."
      )
  return best[0]


def split_key(key: str) -> tuple[str, str] | None:
  """``"ups.0.weight_g"`` -> ``("ups.0", "weight_g")``; ``None`` if no layer key ends it."""
  for suffix in LAYER_KEYS:
    if key == suffix:
      return "", suffix
    if key.endswith("." + suffix):
      return key[: -len(suffix) - 1], suffix
  return None


def join(prefix: str, name: str) -> str:
  """``"enc" + "lstm"`` -> ``"enc.lstm"``; a name at the root stays bare."""
  return f"{prefix}.{name}" if prefix else name


_ROLES = "|".join(re.escape(k[len(PREFIX) :]) for k in _WEIGHT_KEYS if k.startswith(PREFIX))
_SUFFIXES = "|".join(k[len("weight") :] for k in _LEGACY)


def split_named(key: str, names: str) -> tuple[str, str, str] | None:
  """A key of a weight PyTorch keeps under its own name, read as a layer's key.

  Recurrent and attention modules name their weights (``weight_hh_l0``,
  ``in_proj_weight``), and a norm applied to one keeps that name where a
  layer has ``weight``: ``weight_hh_l0_g``,
  ``parametrizations.in_proj_weight.original0``.

  Args:
    key: the state-dict key.
    names: a regex of the weight names (no groups).

  Returns:
    ``(prefix, name, key as a layer's)``, e.g. ``("enc.lstm", "weight_hh_l0",
    "weight_g")``; ``None`` if ``key`` is no such key.
  """
  if m := re.fullmatch(rf"(?:(.*)\.)?parametrizations\.({names})\.({_ROLES})", key):
    return m[1] or "", m[2], PREFIX + m[3]
  if m := re.fullmatch(rf"(?:(.*)\.)?({names})({_SUFFIXES})?", key):
    return m[1] or "", m[2], "weight" + (m[3] or "")
  return None


def named(key: str, name: str) -> str:
  """The inverse of :func:`split_named`: ``("weight_g", "weight_hh_l0")`` -> ``"weight_hh_l0_g"``."""
  if key.startswith(PREFIX):
    return f"parametrizations.{name}.{key[len(PREFIX) :]}"
  return name + key[len("weight") :]
