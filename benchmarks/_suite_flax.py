"""The suite's Linen and NNX faces: the three models, flaxnorm's and Flax's own wrappers.

Every model takes a ``wrap`` that turns a freshly built linear layer into the
variant's (``lambda m: m`` for plain). ``build_linen`` / ``build_nnx`` return
a :class:`_suite_common.Run` with a pure train step (NNX through
``nnx.split``/``nnx.merge``, so both faces compile the same way).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable

import _suite_shapes as shapes
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _suite_common import Run, adam_step, as_matrix, data, kernel_bytes, mse
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx
from flaxnorm import _output_scale

# --------------------------------------------------------------------------- #
# Linen
# --------------------------------------------------------------------------- #


class LinenNet(nn.Module):
  """The three models in Linen; ``layer(cls, *args, **kw)`` builds each wrapped linear layer."""

  arch: str
  wrap: Callable
  dtype: jnp.dtype = jnp.float32

  def layer(self, cls, *args, **kwargs):
    return self.wrap(cls(*args, **kwargs, dtype=self.dtype, param_dtype=self.dtype))

  @nn.compact
  def __call__(self, x):
    if self.arch == "mlp":
      for f in shapes.MLP_SIZES[1:-1]:
        x = nn.relu(self.layer(nn.Dense, f)(x))
      return self.layer(nn.Dense, shapes.MLP_SIZES[-1])(x)
    if self.arch == "disc":
      for c in shapes.DISC_CHANNELS:
        x = nn.leaky_relu(self.layer(nn.Conv, c, (3, 3), strides=(2, 2))(x), 0.2)
      return self.layer(nn.Dense, 1)(x.reshape(x.shape[0], -1))
    x = self.layer(nn.Conv, shapes.GEN_CHANNELS, (7,))(x)
    for ch, k, s in shapes.GEN_UPS:
      x = self.layer(nn.ConvTranspose, ch, (k,), strides=(s,))(nn.leaky_relu(x, 0.1))
      for d in shapes.GEN_DILATIONS:
        t = self.layer(nn.Conv, ch, (3,), kernel_dilation=(d,))(nn.leaky_relu(x, 0.1))
        x = x + self.layer(nn.Conv, ch, (3,))(nn.leaky_relu(t, 0.1))
    return jnp.tanh(self.layer(nn.Conv, 1, (7,))(nn.leaky_relu(x, 0.1)))


@contextlib.contextmanager
def forced_side(ratio: float):
  """Forces flaxnorm's output-or-kernel choice while a step is traced.

  ``inf``: always scale the output (flaxnorm before the per-call choice);
  ``0``: always scale the kernel.
  """
  names = ("KERNEL_SIDE_RATIO", "CONV_KERNEL_SIDE_RATIO")
  saved = [getattr(_output_scale, n) for n in names]
  for n in names:
    setattr(_output_scale, n, ratio)
  try:
    yield
  finally:
    for n, value in zip(names, saved):
      setattr(_output_scale, n, value)


def linen_wraps(n_power: int) -> dict[str, Callable]:
  """Linen variant name -> wrap."""
  return {
    "plain": lambda m: m,
    "flaxnorm WN": flaxnorm.weight_norm,
    "flaxnorm SN": lambda m: flaxnorm.spectral_norm(m, n_power_iterations=n_power),
    "flaxnorm SN operator": lambda m: flaxnorm.spectral_norm(
      m, n_power_iterations=n_power, operator=True
    ),
    "flax.linen WN": nn.WeightNorm,
    "flax.linen SN": lambda m: functools.partial(
      nn.SpectralNorm(m, n_steps=n_power), update_stats=True
    ),
  }


# Variants measured with the output-or-kernel choice forced (see forced_side).
FORCED = {" [output side]": float("inf"), " [kernel side]": 0.0}


def build_linen(
  variant: str, model: str, dtype=jnp.float32, n_power=1, lr=shapes.LR, tx=None
) -> Run:
  """A Linen run: ``variant`` from :func:`linen_wraps`, optionally with a FORCED suffix."""
  base, trace = variant, None
  for suffix, ratio in FORCED.items():
    if variant.endswith(suffix):
      base, trace = variant.removesuffix(suffix), functools.partial(forced_side, ratio)
  net = LinenNet(shapes.MODELS[model][0], linen_wraps(n_power)[base], dtype)
  x, y = data(model, dtype)
  with trace() if trace else contextlib.nullcontext():
    variables = net.init(jax.random.key(0), x)
  variables = {**variables, "params": _kernels_as(variables["params"], dtype)}
  run = linen_run(net, variables, x, y, tx or optax.adam(lr))
  run.trace = trace
  if "SN" in base and not base.endswith("operator"):
    run.sigmas = _linen_sigmas
  if base != "plain":
    run.normalized_bytes = kernel_bytes(variables["params"])
  return run


def _kernels_as(params, dtype):
  """``params`` with every ``kernel`` in ``dtype``, the dtype its layer was built with.

  ``flax.linen.WeightNorm`` and ``SpectralNorm`` (flax 0.12) return from
  ``init`` the wrapped layer's kernel promoted to float32, whatever its
  ``param_dtype``: a bfloat16 layer trained as it comes would keep float32
  kernels and Adam moments (twice the state, and no bfloat16 kernel for XLA:CPU
  to widen). A bfloat16 user casts them back; so does the suite (a no-op for
  every other row).
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, a: a.astype(dtype) if path[-1].key == "kernel" else a, params
  )


def linen_run(net: nn.Module, variables, x, y, tx) -> Run:
  """A Run over any Linen module: every collection but params is updated in training."""
  params = variables["params"]
  stats = {k: v for k, v in variables.items() if k != "params"}
  mutable = list(stats)

  def step(state, x, y):
    params, opt_state, stats = state

    def loss_fn(params):
      out, new = net.apply({"params": params, **stats}, x, mutable=mutable)
      return mse(out, y), new

    (params, opt_state, new), loss = adam_step(loss_fn, tx, params, opt_state)
    return (params, opt_state, dict(new)), loss

  return Run(step, (params, tx.init(params), stats), x, y)


def _walk(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _linen_sigmas(state):
  """(stored sigma, raw kernel) of every spectrally normalized Dense (flaxnorm or flax)."""
  params, _, stats = state
  if "spectral" in stats:
    return [(s, as_matrix(_walk(params, k))) for k, s in flaxnorm.spectral_sigmas(stats).items()]
  out = []
  for entries in stats["batch_stats"].values():  # {"SpectralNorm_0": {"Dense_0/kernel/sigma"}}
    for key, s in entries.items():
      if key.endswith("/sigma"):
        out.append((s, as_matrix(_walk(params, key.removesuffix("/sigma")))))
  return out


# --------------------------------------------------------------------------- #
# NNX
# --------------------------------------------------------------------------- #


class NNXNet(nnx.Module):
  """The three models in NNX; ``wrap(layer, rngs)`` returns the layer to call."""

  def __init__(self, arch: str, wrap: Callable, dtype, rngs: nnx.Rngs):
    self.arch = arch

    def layer(cls, *args, **kwargs):
      return wrap(cls(*args, **kwargs, dtype=dtype, param_dtype=dtype, rngs=rngs), rngs)

    if arch == "mlp":
      self.layers = nnx.List(
        [layer(nnx.Linear, a, b) for a, b in itertools.pairwise(shapes.MLP_SIZES)]
      )
    elif arch == "disc":
      chans = (3, *shapes.DISC_CHANNELS)
      convs = [layer(nnx.Conv, a, b, (3, 3), strides=(2, 2)) for a, b in itertools.pairwise(chans)]
      self.layers = nnx.List([*convs, layer(nnx.Linear, 4 * 4 * shapes.DISC_CHANNELS[-1], 1)])
    else:
      self.pre = layer(nnx.Conv, shapes.GEN_IN, shapes.GEN_CHANNELS, (7,))
      ups, blocks, c_in = [], [], shapes.GEN_CHANNELS
      for ch, k, s in shapes.GEN_UPS:
        ups.append(layer(nnx.ConvTranspose, c_in, ch, (k,), strides=(s,)))
        for d in shapes.GEN_DILATIONS:
          blocks.append(layer(nnx.Conv, ch, ch, (3,), kernel_dilation=(d,)))
          blocks.append(layer(nnx.Conv, ch, ch, (3,)))
        c_in = ch
      self.ups, self.blocks = nnx.List(ups), nnx.List(blocks)
      self.post = layer(nnx.Conv, c_in, 1, (7,))

  def __call__(self, x):
    if self.arch == "mlp":
      for lin in self.layers[:-1]:
        x = nnx.relu(lin(x))
      return self.layers[-1](x)
    if self.arch == "disc":
      for conv in self.layers[:-1]:
        x = nnx.leaky_relu(conv(x), 0.2)
      return self.layers[-1](x.reshape(x.shape[0], -1))
    x = self.pre(x)
    blocks = iter(self.blocks)
    for up in self.ups:
      x = up(nnx.leaky_relu(x, 0.1))
      for _ in shapes.GEN_DILATIONS:
        t = next(blocks)(nnx.leaky_relu(x, 0.1))
        x = x + next(blocks)(nnx.leaky_relu(t, 0.1))
    return jnp.tanh(self.post(nnx.leaky_relu(x, 0.1)))


def nnx_wraps(n_power: int) -> dict[str, Callable]:
  """NNX variant name -> wrap(layer, rngs)."""
  return {
    "plain": lambda m, rngs: m,
    "flaxnorm WN": lambda m, rngs: fnx.weight_norm(m),
    "flaxnorm SN": lambda m, rngs: fnx.spectral_norm(m, n_power_iterations=n_power, rngs=rngs),
    # flax.nnx writes the normalized kernel back into the layer in the dtype its
    # scale (float32) promotes it to unless `dtype` is set: a bfloat16 kernel
    # would become float32 after the first step.
    "flax.nnx WN": lambda m, rngs: nnx.WeightNorm(m, dtype=m.param_dtype, rngs=rngs),
    "flax.nnx SN": lambda m, rngs: nnx.SpectralNorm(m, n_steps=n_power, rngs=rngs),
  }


def _disc_inputs() -> list[tuple[int, ...]]:
  """One example's input shape at each layer of the discriminator (operator mode's)."""
  side, _, c_in = shapes.DISC_IN
  sizes = [side // 2**i for i in range(len(shapes.DISC_CHANNELS) + 1)]
  chans = (c_in, *shapes.DISC_CHANNELS)
  convs = [(n, n, c) for n, c in zip(sizes, chans[:-1])]
  return [*convs, (sizes[-1] ** 2 * chans[-1],)]


def _nnx_net(variant: str, model: str, dtype, n_power: int) -> NNXNet:
  """The NNX model of a variant; operator mode is wrapped layer by layer with its inputs."""
  arch, rngs = shapes.MODELS[model][0], nnx.Rngs(0)
  if variant != "flaxnorm SN operator":
    return NNXNet(arch, nnx_wraps(n_power)[variant], dtype, rngs)
  if arch != "disc":
    raise ValueError(f"{variant}: the suite runs operator mode on the discriminator only")
  net = NNXNet(arch, nnx_wraps(n_power)["plain"], dtype, rngs)
  for lin, example in zip(net.layers, _disc_inputs(), strict=True):
    fnx.spectral_norm(
      lin, n_power_iterations=n_power, operator=True, input_shape=example, rngs=rngs
    )
  return net


def build_nnx(variant: str, model: str, dtype=jnp.float32, n_power=1, lr=shapes.LR) -> Run:
  """An NNX run: the model and ``nnx.Optimizer`` split into a graphdef and a state."""
  net = _nnx_net(variant, model, dtype, n_power)
  optimizer = nnx.Optimizer(net, optax.adam(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((net, optimizer))
  x, y = data(model, dtype)

  def step(state, x, y):
    net, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(net)
    optimizer.update(net, grads)
    return nnx.state((net, optimizer)), loss

  def sigmas(state):
    net, _ = nnx.merge(graphdef, state)
    if variant == "flaxnorm SN":
      return [
        (fnx.spectral_sigmas(lin)["kernel"], as_matrix(vars(lin)["kernel"][...]))
        for lin in net.layers
      ]
    return [
      (sn.batch_stats[("kernel", "sigma")][...], as_matrix(sn.layer_instance.kernel[...]))
      for sn in net.layers
    ]

  sn = "SN" in variant and not variant.endswith("operator")
  run = Run(step, state, x, y, sigmas=sigmas if sn else None)
  if variant != "plain":
    run.normalized_bytes = kernel_bytes(nnx.to_pure_dict(nnx.state(net, nnx.Param)))
  return run
