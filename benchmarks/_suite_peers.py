"""The suite's equinox and Haiku faces (each skipped when not installed).

equinox: ``eqx.nn.WeightNorm`` / ``eqx.nn.SpectralNorm`` around each layer,
weights (out, in, ...), one example at a time under ``jax.vmap``. Haiku:
``hk.SNParamsTree`` over the params of the plain network (Haiku has no weight
norm). Same shapes, padding and loss as the Flax faces.
"""

from __future__ import annotations

import importlib.util
import itertools

import _suite_shapes as shapes
import jax
import jax.numpy as jnp
import optax
from _suite_common import Run, adam_step, as_matrix, data, kernel_bytes, mse

HAVE_EQX = importlib.util.find_spec("equinox") is not None
HAVE_HAIKU = importlib.util.find_spec("haiku") is not None
EQX_VARIANTS = ("plain", "equinox WN", "equinox SN")
HAIKU_VARIANTS = ("plain", "haiku SNParamsTree")

# --------------------------------------------------------------------------- #
# equinox
# --------------------------------------------------------------------------- #


def _eqx_layers(arch: str, key):
  """The plain layers of one model, in call order, and their calling plan."""
  import equinox as eqx

  keys = iter(jax.random.split(key, 64))
  if arch == "mlp":
    return [eqx.nn.Linear(a, b, key=next(keys)) for a, b in itertools.pairwise(shapes.MLP_SIZES)]
  if arch == "disc":
    chans = (3, *shapes.DISC_CHANNELS)
    convs = [
      eqx.nn.Conv2d(a, b, 3, stride=2, padding=((0, 1), (0, 1)), key=next(keys))
      for a, b in itertools.pairwise(chans)
    ]
    return [*convs, eqx.nn.Linear(4 * 4 * shapes.DISC_CHANNELS[-1], 1, key=next(keys))]
  layers, c_in = (
    [eqx.nn.Conv1d(shapes.GEN_IN, shapes.GEN_CHANNELS, 7, padding=3, key=next(keys))],
    shapes.GEN_CHANNELS,
  )
  for ch, k, s in shapes.GEN_UPS:
    layers.append(
      eqx.nn.ConvTranspose1d(c_in, ch, k, stride=s, padding=(k - s) // 2, key=next(keys))
    )
    for d in shapes.GEN_DILATIONS:
      layers.append(eqx.nn.Conv1d(ch, ch, 3, dilation=d, padding=d, key=next(keys)))
      layers.append(eqx.nn.Conv1d(ch, ch, 3, padding=1, key=next(keys)))
    c_in = ch
  return [*layers, eqx.nn.Conv1d(c_in, 1, 7, padding=3, key=next(keys))]


def _eqx_forward(arch, layers, x, state):
  """One example (channels last, as the data) through the layers; returns (out, state)."""
  import equinox as eqx

  def call(layer, h):
    nonlocal state
    if isinstance(layer, eqx.nn.SpectralNorm):
      h, state = layer(h, state)
      return h
    return layer(h)

  if arch == "mlp":
    for layer in layers[:-1]:
      x = jax.nn.relu(call(layer, x))
    return call(layers[-1], x), state
  x = jnp.moveaxis(x, -1, 0)  # channels first
  if arch == "disc":
    for layer in layers[:-1]:
      x = jax.nn.leaky_relu(call(layer, x), 0.2)
    return call(layers[-1], x.reshape(-1)), state
  lrelu = lambda h: jax.nn.leaky_relu(h, 0.1)
  x, rest = call(layers[0], x), iter(layers[1:-1])
  for _ in shapes.GEN_UPS:
    x = call(next(rest), lrelu(x))
    for _ in shapes.GEN_DILATIONS:
      t = call(next(rest), lrelu(x))
      x = x + call(next(rest), lrelu(t))
  return jnp.moveaxis(jnp.tanh(call(layers[-1], lrelu(x))), 0, -1), state


def build_eqx(variant: str, model: str, dtype=jnp.float32, n_power=1, lr=shapes.LR) -> Run:
  import equinox as eqx

  arch = shapes.MODELS[model][0]
  keys = iter(jax.random.split(jax.random.key(0), 64))
  # Cast before wrapping: SpectralNorm's u and v take the weight's dtype (cast
  # after, they stay float32 and a bfloat16 convolution refuses the f32 weight).
  layers = jax.tree.map(
    lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, _eqx_layers(arch, next(keys))
  )
  if variant == "equinox WN":
    layers = [eqx.nn.WeightNorm(layer) for layer in layers]
  elif variant == "equinox SN":
    layers = [
      eqx.nn.SpectralNorm(layer, "weight", num_power_iterations=n_power, key=next(keys))
      for layer in layers
    ]
  sn_state = eqx.nn.State(layers)
  params, static = eqx.partition(layers, eqx.is_inexact_array)
  tx = optax.adam(lr)
  x, y = data(model, dtype)

  def step(state, x, y):
    params, opt_state, sn_state = state

    def loss_fn(params):
      net = eqx.combine(params, static)
      fwd = jax.vmap(
        lambda xi, s: _eqx_forward(arch, net, xi, s),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
      )
      out, new_state = fwd(x, sn_state)
      return mse(out, y), new_state

    return adam_step(loss_fn, tx, params, opt_state)

  def sigmas(state):
    params, _, sn_state = state
    out = []
    for sn in eqx.combine(params, static):
      u, v = sn_state.get(sn.uv_index)
      w = sn.layer.weight.reshape(sn.layer.weight.shape[0], -1)
      out.append((u @ w @ v, as_matrix(sn.layer.weight, 0)))
    return out

  run = Run(step, (params, tx.init(params), sn_state), x, y)
  if variant != "plain":
    run.normalized_bytes = kernel_bytes(params)
    run.sigmas = sigmas if variant == "equinox SN" else None
  return run


# --------------------------------------------------------------------------- #
# Haiku
# --------------------------------------------------------------------------- #


def _haiku_net(arch: str, x):
  import haiku as hk

  if arch == "mlp":
    for f in shapes.MLP_SIZES[1:-1]:
      x = jax.nn.relu(hk.Linear(f)(x))
    return hk.Linear(shapes.MLP_SIZES[-1])(x)
  if arch == "disc":
    for c in shapes.DISC_CHANNELS:
      x = jax.nn.leaky_relu(hk.Conv2D(c, 3, stride=2, padding="SAME")(x), 0.2)
    return hk.Linear(1)(x.reshape(x.shape[0], -1))
  lrelu = lambda h: jax.nn.leaky_relu(h, 0.1)
  x = hk.Conv1D(shapes.GEN_CHANNELS, 7)(x)
  for ch, k, s in shapes.GEN_UPS:
    x = hk.Conv1DTranspose(ch, k, stride=s, padding="SAME")(lrelu(x))
    for d in shapes.GEN_DILATIONS:
      t = hk.Conv1D(ch, 3, rate=d)(lrelu(x))
      x = x + hk.Conv1D(ch, 3)(lrelu(t))
  return jnp.tanh(hk.Conv1D(1, 7)(lrelu(x)))


def build_haiku(variant: str, model: str, dtype=jnp.float32, n_power=1, lr=shapes.LR) -> Run:
  import haiku as hk

  arch = shapes.MODELS[model][0]
  net = hk.without_apply_rng(hk.transform(lambda x: _haiku_net(arch, x)))
  x, y = data(model, dtype)
  params = net.init(jax.random.key(0), x)
  sn = hk.without_apply_rng(
    hk.transform_with_state(lambda p: hk.SNParamsTree(n_steps=n_power, ignore_regex=".*b$")(p))
  )
  use_sn = variant != "plain"
  sn_state = sn.init(jax.random.key(1), params)[1] if use_sn else {}
  tx = optax.adam(lr)

  def step(state, x, y):
    params, opt_state, sn_state = state

    def loss_fn(params):
      new = sn_state
      if use_sn:
        params, new = sn.apply(None, sn_state, params)
      return mse(net.apply(params, x), y), new

    return adam_step(loss_fn, tx, params, opt_state)

  def sigmas(state):
    params, _, sn_state = state
    out = []
    for key, entry in sn_state.items():
      module, name = key.split("/", 1)[1].rsplit("__", 1)
      out.append((entry["sigma"], as_matrix(params[module][name])))
    return out

  run = Run(step, (params, tx.init(params), sn_state), x, y)
  if use_sn:
    run.normalized_bytes, run.sigmas = kernel_bytes(params), sigmas
  return run
