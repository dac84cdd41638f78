"""The certified Lipschitz bound of a ``flax.nnx`` model (:func:`flaxnorm.nnx.lipschitz_bound`).

An NNX model holds its variables, so every layer is followed primitive by
primitive with their values known (:mod:`flaxnorm._propagate`): a kernel,
spectrally normalized or not, is bounded by the certified norm of what the
layer computes with it (``W · target / σ`` from the stored vectors, ``g · v /
‖v‖``), not by its stored σ. Each module's calls are marked
(:mod:`flaxnorm._call_counts`) in a copy of the model while it is traced, so runs are counted, a reason names the module running where
it arose, and a linear layer's certified norm is read from the walk (its
output's bound over its input's).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxnorm import (
  _call_counts,
  _nnx_layer,
  _nnx_plan,
  _output_scale,
  _propagate,
  _reports,
  _subclass,
)

_AT = "lipschitz_bound"
_PATH = "_flaxnorm_bound_path"  # a module's path, on the model's copy (kept by nnx transforms)
#: Layers whose kernel gets a row in the report (NNX's linear layers).
LINEAR = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)


class _Calls:
  """The marked calls of one trace."""

  def __init__(self, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    self.count = 0
    self.active: list[str] = []  # paths being called: a nested call is the same run
    self.shapes = shapes  # each called module's variables' shapes, as it sees them


_WRAPPING = threading.Lock()
_RUNNING: contextvars.ContextVar[_Calls | None] = contextvars.ContextVar("flaxnorm_nnx_bound")


def lipschitz_bound(
  model: nnx.Module, inputs: Any, kwargs: Any, n_gram_steps: Any
) -> _reports.LipschitzBound:
  """:func:`flaxnorm.nnx.lipschitz_bound` (its arguments not yet checked)."""
  call, steps = _check_args(model, inputs, kwargs, n_gram_steps)
  graphdef, state = nnx.split(model)
  values, state_def = jax.tree.flatten(state)
  inside: dict[str, dict[str, tuple[int, ...]]] = {}

  def trace(traced: list[int]) -> Any:
    def run(values: list[Any], arrays: list[Any]) -> Any:
      copy = nnx.merge(graphdef, jax.tree.unflatten(state_def, values))
      args, kwargs = _reports.with_traced(call, traced, arrays)
      with _marked(copy, inside), _output_scale.kernel_side():
        return copy(*args, **kwargs)

    leaves = jax.tree.leaves(call)
    closed = jax.make_jaxpr(run)(values, [leaves[i] for i in traced])
    return closed, _reports.read_program(closed, len(values), call, traced)

  (closed, (dependent, fixed, counts)), floats = _reports.traced_inputs(trace, call)
  known = {i: np.asarray(x) for i, x in enumerate(values) if not _is_key(x)}
  found = _propagate.bound(closed, dependent, {}, {**known, **fixed}, n_steps=steps)
  reasons = {} if found.why is None else {found.where or _reports._TOP: found.why}
  _reports.add_unchained(reasons, counts.unchained | (set() if floats else {"inputs"}))
  sliced = {p for p, m in _modules(model) if p in found.unmeasured and _sliced(m, inside.get(p))}
  layers = _layers(model, counts.runs, {p: b for p, b in found.layers.items() if p not in sliced})
  estimate = _reports._product([e for e, _ in layers.values()])
  return _reports.LipschitzBound(estimate, None if reasons else found.value, layers, reasons)


def _check_args(
  model: Any, inputs: Any, kwargs: Any, n_gram_steps: Any
) -> tuple[_reports.Call, int]:
  """The model's call and the Gram steps, checked."""
  if not isinstance(model, nnx.Module):
    hint = ""
    if isinstance(model, nn.Module):
      hint = " (a Linen model: use flaxnorm.lipschitz_bound(variables, model=..., inputs=...))"
    raise TypeError(
      f"{_AT}: model must be a flax.nnx.Module instance, got {type(model).__name__}{hint}."
    )
  call = _reports.check_call(inputs, kwargs, "the model's call arguments")
  return call, _reports.check_gram_steps(n_gram_steps)


def _is_key(x: Any) -> bool:
  """Whether ``x`` is a PRNG key (an ``nnx.Rngs`` stream's: what it draws is not known)."""
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _layers(
  model: nnx.Module, runs: Mapping[str, float], certified: Mapping[str, float]
) -> dict[str, tuple[jax.Array, float | None]]:
  """The report's rows: each spectrally normalized param's effective norm (the
  largest member's in an ``nnx.vmap`` ensemble) and each other linear layer's
  kernel's certified norm, with the layer's certified norm, to the power of its
  most runs; layers the model does not run are left out."""
  rows: dict[str, tuple[jax.Array, float | None]] = {}
  for path, module in _modules(model):
    most = runs.get(path, 0.0)
    if not most:
      continue
    bound = certified.get(path)
    power = None if bound is None else _reports.power(bound, most)
    spectral = {
      n: s
      for n, s in _subclass.specs_of(type(module)).items()
      if isinstance(s, _nnx_layer.SpectralNormSpec)
    }
    for name, spec in spectral.items():
      sigma = vars(module)[spec.attrs(name)[2]][...]
      norm = _reports._effective_norm(sigma, spec.options.target, spec.options.mode).max()
      rows[_reports._join(path, name)] = (_reports.power(norm, most), power)
    if not spectral and isinstance(module, LINEAR) and power is not None:
      rows[_reports._join(path, "kernel")] = (jnp.asarray(power, np.float32), power)
  return rows


def _shapes(module: Any) -> dict[str, tuple[int, ...]]:
  """The shapes of ``module``'s own array variables."""
  found = {}
  for k, v in vars(module).items():
    shape = getattr(v.get_value(), "shape", None) if isinstance(v, nnx.Variable) else None
    if shape is not None:
      found[k] = tuple(shape)
  return found


def _sliced(module: nnx.Module, inside: Mapping[str, tuple[int, ...]] | None) -> bool:
  """Whether ``module`` computed with slices of its variables (stacked by ``nnx.vmap``,
  each step of an ``nnx.scan`` its own member): then a run on a constant (an RNN's zero
  initial carry) leaves a member's norm out of its row."""
  return inside is not None and any(inside.get(k, s) != s for k, s in _shapes(module).items())


def _modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """Each module of ``model`` once, with its path (``""`` for the model)."""
  for parts, module in _nnx_plan.iter_modules(model):
    yield "/".join(map(str, parts)), module


@contextlib.contextmanager
def _marked(copy: nnx.Module, inside: dict[str, dict[str, tuple[int, ...]]]) -> Iterator[None]:
  """Marks the calls of every module of ``copy`` (a copy of the model, its modules told
  their paths) while the trace runs: their classes' ``__call__`` is wrapped for that
  time (no subclass: that would change how NNX flattens a ``pytree=False`` module and
  run the user's ``__init_subclass__``); a module of another model passes through.
  ``inside`` gets each called module's variables' shapes as it sees them."""
  modules = list(_modules(copy))
  for path, module in modules:
    object.__setattr__(module, _PATH, path)  # NNX's __setattr__ would make it a field
  classes = {type(m) for _, m in modules}
  with _WRAPPING:  # one trace at a time wraps classes (each restores what it found)
    calls = {cls: cls.__call__ for cls in classes}  # as resolved before any is wrapped
    own = {cls: vars(cls).get("__call__") for cls in classes}
    token = _RUNNING.set(_Calls(inside))
    try:
      for cls, call in calls.items():
        type.__setattr__(cls, "__call__", _marking(call))
      yield
    finally:
      _RUNNING.reset(token)
      for cls, call in own.items():
        if call is None:
          type.__delattr__(cls, "__call__")
        else:
          type.__setattr__(cls, "__call__", call)


def _marking(call: Callable[..., Any]) -> Callable[..., Any]:
  """``call`` (a class's ``__call__``) with each call marked."""

  @functools.wraps(call)
  def marked(self: Any, *args: Any, **kwargs: Any) -> Any:
    return _call(call, self, args, kwargs)

  return marked


def _call(call: Callable[..., Any], module: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
  """One call of ``module``, marked when a trace is running and it is not nested in
  another call of the same module."""
  calls, path = _RUNNING.get(), vars(module).get(_PATH)
  if calls is None or path is None or path in calls.active:
    return call(module, *args, **kwargs)
  number = calls.count
  calls.count += 1
  calls.shapes.setdefault(path, _shapes(module))
  args, kwargs = _call_counts.mark(args, kwargs, path, number)
  calls.active.append(path)
  try:
    out = call(module, *args, **kwargs)
  finally:
    calls.active.pop()
  return _call_counts.mark_output(out, path, number, certified=False)
