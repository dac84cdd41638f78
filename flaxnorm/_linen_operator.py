"""Operator-mode spectral norm for Linen: the layer's own linear map (see ``_operator``).

Kernel mode estimates the norm of the kernel's matrix view; for a convolution
that is not the norm of what the layer computes (it can be off by up to
``sqrt(kh * kw)``). Operator mode iterates through the layer itself: a plain
copy of the layer (same class and fields, computing in float32 at least) is
applied to one example, and its transpose comes from ``jax.vjp``. Any layer
linear in its input and its kernel works without per-layer code: ``Dense``,
``DenseGeneral``, ``Conv`` with any strides, padding (``CIRCULAR`` too), dilation and groups,
``ConvTranspose``, ``ConvLocal``. The linear part is taken as a JVP at zero, so
the bias plays no part.

Sigma is exact for the input size seen at init: with zero padding it grows
with the size toward the circular value; with circular padding it is the same
for every size at least the kernel's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax.core import Tracer

from flaxnorm import _math, _operator, _subclass

#: The layer's call arguments, kept on the module during its ``__call__``.
INPUTS = "_flaxnorm_inputs"


def _plain_copy(module: nn.Module) -> nn.Module:
  """An unbound plain layer with ``module``'s fields, computing in float32 at least."""
  base = _subclass.base_of(type(module))
  fields = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)  # pyright: ignore[reportArgumentType]
    if f.init and f.name not in ("parent", "name")
  }
  for key in ("dtype", "param_dtype"):
    if key in fields:
      own = fields[key] if fields[key] is not None else jnp.float32
      fields[key] = _math.wider(own, jnp.float32)
  return base(**fields, parent=None)


def _check_one_batch_axis(module: nn.Module, shape: tuple[int, ...], at: str) -> None:
  """Operator mode's example is the input less its first axis: that axis must be the batch."""
  kernel_size = getattr(module, "kernel_size", None)
  if kernel_size is not None:  # a convolution: (batch, *spatial, features)
    ndim = (len(kernel_size) if isinstance(kernel_size, Sequence) else 1) + 2
    want = f"{ndim} dims (batch, {ndim - 2} spatial, features)"
  else:
    ndim, want = None, "a batch axis first"
  if (ndim is not None and len(shape) != ndim) or len(shape) < 2:
    raise ValueError(
      f"spectral_norm(operator=True): {at} needs inputs with one batch axis, {want}; got "
      f"shape {tuple(shape)}. Its sigma is the norm for one example: add or merge batch axes."
    )


def _check_concrete(args: tuple, kwargs: dict[str, Any], at: str) -> None:
  """Raises for call arguments beyond the input that are traced: the checks need values."""
  named = [(f"positional argument {i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())
  traced = [name for name, a in named if any(isinstance(x, Tracer) for x in jax.tree.leaves(a))]
  if traced:
    raise ValueError(
      f"spectral_norm(operator=True): {at}: the layer's call argument(s) {', '.join(traced)} "
      "(beyond its input) are traced where its spectral state is created (an init under jit "
      "or vmap), but the checks that the layer is linear run on concrete values: call init "
      "outside jit, or with concrete values for these arguments."
    )


class LayerMap:
  """The wrapped layer's linear map ``x -> A_w x`` on one example, for a kernel ``w``.

  Args:
    module: the normalized layer, inside its ``__call__``.
    name: the normalized param.
    at: the param's description, for errors.
  """

  def __init__(self, module: nn.Module, name: str, at: str):
    call = module.__dict__.get(INPUTS)
    if call is None:
      raise ValueError(
        f"spectral_norm(operator=True): {at} was asked for outside the layer's __call__; "
        "operator mode needs the layer's inputs."
      )
    args, kwargs = call
    inputs = args[0] if args else kwargs["inputs"]
    _check_one_batch_axis(module, jnp.shape(inputs), at)
    self.example = jnp.zeros((1, *jnp.shape(inputs)[1:]), jnp.float32)
    self.rest = (args[1:], {k: x for k, x in kwargs.items() if k != "inputs"})
    self.plain, self.name, self.module = _plain_copy(module), name, module
    self._others: dict[str, Any] | None = None

  def _params(self, w: jax.Array) -> dict[str, Any]:
    """The plain layer's params with kernel ``w``; the others are the layer's own."""
    if self._others is None:
      have = dict(self.module.variables.get("params", {}))
      if self.module.is_initializing():  # params the layer creates after the kernel
        args, kwargs = self.rest
        made = self.plain.init(jax.random.key(0), self.example, *args, **kwargs)
        have = {**made["params"], **have}
      self._others = {k: meta.unbox(x) for k, x in have.items() if k != self.name}
    return {**self._others, self.name: w}

  def linear(self, w: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``x -> A_w x`` (the JVP at zero: no bias), float32 at least."""
    return self._linear_with(self._params(w.astype(_math.wider(w.dtype, jnp.float32))))

  def _linear_with(self, params: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    args, kwargs = self.rest

    def f(x):
      return self.plain.apply({"params": params}, x, *args, **kwargs)

    return lambda x: jax.jvp(f, (jnp.zeros_like(x),), (x,))[1]

  def check_linear(self, w_shape: tuple[int, ...], at: str) -> None:
    """Raises unless the layer is linear in its input and its kernel (see ``_operator``)."""
    args, kwargs = self.rest
    _check_concrete(args, kwargs, at)
    # Concrete params (the layer's own may be traced), fixed values of the shapes
    # its init makes: running the initializers here would compile them once more
    # (under ensure_compile_time_eval), ~6 s for a truncated normal on CPU.
    shapes = jax.eval_shape(self.plain.init, jax.random.key(0), self.example, *args, **kwargs)
    leaves, tree = jax.tree.flatten(meta.unbox(shapes["params"]))
    others = tree.unflatten(
      [_operator.stand_in(s.shape, s.dtype, 3.0 + i) for i, s in enumerate(leaves)]
    )  # numpy: concrete inside a trace
    params = {**others, self.name: _operator.probe(w_shape, seed=2.0)}

    def f(x: jax.Array) -> jax.Array:
      return jnp.asarray(self.plain.apply({"params": params}, x, *args, **kwargs))

    example = tuple(self.example.shape)
    _operator.check_linear(f, example, at)
    _operator.check_kernel_linear(
      lambda w: self._linear_with({**others, self.name: w}), w_shape, example, at
    )
