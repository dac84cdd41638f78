"""The MLP's weight-norm floor: reference layers, and the tries to get under it.

At batch 128 the three 1024x1024 kernels dominate the step. The references
split weight norm's cost in parts (``ScaledDense``, ``ScaledOutputDense``); the
tries change what XLA gets to fuse:

* ``FusedWNDense``: the layer ``(x @ v) * g / ||v|| + b`` as one ``custom_vjp``
  whose backward computes ``dx``, ``dv`` (with the norm's correction folded into
  one expression), ``dg`` and ``db`` together;
* donation of params and optimizer state (``donate_argnums``);
* ``stacked_adam``: Adam with both moments in one ``(2, ...)`` array, so that one
  loop reads each gradient (and the ``v`` in it) once for both moment updates.
"""

from __future__ import annotations

from typing import NamedTuple

import _suite_shapes as shapes
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _suite_common import Run, data, kernel_bytes
from _suite_flax import linen_run

import flaxnorm


class ScaledDense(nn.Module):
  """Reference: a Dense computing with ``kernel * scale``, ``scale`` a learned (1, out) row."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.linear.default_kernel_init, (x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.ones, (1, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return x @ (kernel * scale) + bias


class ScaledOutputDense(nn.Module):
  """Reference: ``(x @ v) * scale + b``: a learned ``g`` only, or ``g / ||v||`` with the norm fixed."""

  features: int
  norm_fixed: bool = False

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel_v", nn.linear.default_kernel_init, (x.shape[-1], self.features))
    g = self.param("kernel_g", nn.initializers.ones, (1, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    scale = g
    if self.norm_fixed:
      scale = g * jax.lax.stop_gradient(jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True)))
    return (x @ v) * scale + bias


@jax.custom_vjp
def fused_wn_dense(x, v, g, b):
  """``(x @ v) * (g / ||v||) + b`` over columns of ``v`` (in, out); ``g``, ``b`` of shape (out,)."""
  return (x @ v) * (g * jax.lax.rsqrt(jnp.sum(v * v, axis=0))) + b


def _fused_fwd(x, v, g, b):
  inv = jax.lax.rsqrt(jnp.sum(v * v, axis=0))
  xv = x @ v
  return xv * (g * inv) + b, (x, v, g, inv, xv)


def _fused_bwd(res, dy):
  x, v, g, inv, xv = res
  ds = jnp.sum(dy * xv, axis=0)  # d loss / d scale, scale = g / ||v||
  dxv = dy * (g * inv)
  # d v = x^T dxv - (g ds / ||v||^3) v: one expression, one pass over v.
  dv = x.T @ dxv - v * (g * ds * inv**3)
  return dxv @ v.T, dv, ds * inv, jnp.sum(dy, axis=0)


fused_wn_dense.defvjp(_fused_fwd, _fused_bwd)


class FusedWNDense(nn.Module):
  """Try: weight norm's Dense as one custom VJP (g initialized to ``||v||``)."""

  features: int

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel_v", nn.linear.default_kernel_init, (x.shape[-1], self.features))
    g = self.param("kernel_g", lambda _: jnp.sqrt(jnp.sum(v * v, axis=0)))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return fused_wn_dense(x, v, g, b)


class StackedAdamState(NamedTuple):
  count: jax.Array  # shape=(), dtype=int32
  moments: optax.Params  # per param, shape=(2, *param.shape): first and second moment


def stacked_adam(lr: float, b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
  """Try: optax's Adam with both moments of a param in one array, updated in one loop."""

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros((2, *p.shape), p.dtype), params)
    return StackedAdamState(jnp.zeros((), jnp.int32), zeros)

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    c1, c2 = 1 - b1**count, 1 - b2**count

    def one(g, m):
      m = jnp.stack([b1 * m[0] + (1 - b1) * g, b2 * m[1] + (1 - b2) * g * g])
      return -lr * (m[0] / c1) / (jnp.sqrt(m[1] / c2) + eps), m

    pairs = jax.tree.map(one, grads, state.moments)
    is_pair = lambda t: isinstance(t, tuple)
    updates = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    moments = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    return updates, StackedAdamState(count, moments)

  return optax.GradientTransformation(init, update)


class FloorMLP(nn.Module):
  layer: str

  @nn.compact
  def __call__(self, x):
    make = {
      "ref: kernel x learned (1, out) row": ScaledDense,
      "ref: output x learned g": ScaledOutputDense,
      "ref: output x g/|v|, norm held out of the gradient": lambda f: ScaledOutputDense(f, True),
      "try: one fused custom VJP": FusedWNDense,
      "plain": nn.Dense,
      "flaxnorm WN": lambda f: flaxnorm.weight_norm(nn.Dense(f)),
    }[self.layer]
    for f in shapes.MLP_SIZES[1:-1]:
      x = nn.relu(make(f)(x))
    return make(shapes.MLP_SIZES[-1])(x)


# name -> (layer, optimizer, donate); each try has its own plain where it changes the step.
FLOOR = {
  "ref: kernel x learned (1, out) row": ("ref: kernel x learned (1, out) row", "adam", False),
  "ref: output x learned g": ("ref: output x learned g", "adam", False),
  "ref: output x g/|v|, norm held out of the gradient": (
    "ref: output x g/|v|, norm held out of the gradient",
    "adam",
    False,
  ),
  "try: one fused custom VJP": ("try: one fused custom VJP", "adam", False),
  "try: donation, plain": ("plain", "adam", True),
  "try: donation, flaxnorm WN": ("flaxnorm WN", "adam", True),
  "try: stacked-moment Adam, plain": ("plain", "stacked", False),
  "try: stacked-moment Adam, flaxnorm WN": ("flaxnorm WN", "stacked", False),
}
# what each floor row's ratio is taken against (default: the Linen plain)
FLOOR_BASE = {
  "try: donation, flaxnorm WN": "try: donation, plain",
  "try: stacked-moment Adam, flaxnorm WN": "try: stacked-moment Adam, plain",
}


def build_floor(variant: str, model: str = "mlp128", dtype=jnp.float32, n_power=1) -> Run:
  del n_power
  layer, opt, donate = FLOOR[variant]
  net = FloorMLP(layer)
  x, y = data(model, dtype)
  variables = net.init(jax.random.key(0), x)
  tx = stacked_adam(1e-4) if opt == "stacked" else optax.adam(1e-4)
  run = linen_run(net, variables, x, y, tx)
  run.donate = donate
  if layer != "plain":
    run.normalized_bytes = kernel_bytes(variables["params"])
  return run
