"""Output scaling's per-call choice of side: the output when it is small, the kernel when not."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx
from flaxnorm import _output_scale

KEY = jax.random.key(0)


class SubConv(nn.Conv):
  """A subclass always gets the normalized kernel: the kernel-scaling twin."""


def _kernel_sized_muls(fn, arg, shape):
  jaxpr = jax.make_jaxpr(fn)(arg)
  return [e for e in jaxpr.eqns if e.primitive.name == "mul" and e.outvars[0].aval.shape == shape]


@pytest.mark.parametrize(
  "layer, x_shape, positions",
  [
    (nn.Dense(5), (3, 2, 4), 6),
    (nn.Conv(4, (3, 3), strides=2), (2, 9, 8, 3), 2 * 5 * 4),
    (nn.ConvTranspose(4, (16,), strides=(8,)), (2, 5, 3), 2 * 40),
    (nn.Conv(4, (3,)), (7, 3), 7),  # unbatched
  ],
)
def test_output_positions_match_the_output(layer, x_shape, positions):
  """The estimate is the output's size over its feature axis (SAME padding)."""
  x = jnp.ones(x_shape)
  y = layer.apply(layer.init(KEY, x), x)
  assert _output_scale._output_positions(layer, x) == positions == y.size // y.shape[-1]


def test_output_positions_unknown():
  """Several contracted or feature axes: unknown (None), and the output side is kept."""
  x = jnp.ones((2, 3, 4))
  assert _output_scale._output_positions(nn.DenseGeneral((2, 5)), x) is None
  assert _output_scale._output_positions(nn.DenseGeneral(5, axis=(-2, -1)), x) is None
  assert _output_scale._output_positions(nn.Dense(5), None) is None


@pytest.mark.parametrize(
  "wrap", [flaxnorm.weight_norm, lambda m: flaxnorm.spectral_norm(m, n_power_iterations=2)]
)
def test_linen_long_conv_scales_its_kernel(wrap):
  """A 3-tap conv over 64 steps (output 14x its kernel) scales the kernel, exactly as the twin."""
  with jax.enable_x64(True):
    x = jax.random.normal(KEY, (2, 64, 3), jnp.float64)
    fast = wrap(nn.Conv(4, (3,), param_dtype=jnp.float64))
    twin = wrap(SubConv(4, (3,), param_dtype=jnp.float64))
    variables = jax.tree.map(lambda a: a * 1.3 + 0.1, fast.init(KEY, x))

    def loss(params, layer):
      y, updates = layer.apply({**variables, "params": params}, x, mutable=True)
      return jnp.sum(jnp.sin(y)), (y, updates)

    got = jax.grad(loss, has_aux=True)(variables["params"], fast)
    want = jax.grad(loss, has_aux=True)(variables["params"], twin)
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)
    apply = lambda v: fast.apply(v, x, mutable=True)
    assert len(_kernel_sized_muls(apply, variables, (3, 3, 4))) == 1
    # The same conv over 2 steps (output smaller than the kernel) scales its output.
    short = x[:, :2]
    apply = lambda v: fast.apply(v, short, mutable=True)
    assert not _kernel_sized_muls(apply, variables, (3, 3, 4))


def test_nnx_long_conv_scales_its_kernel():
  """NNX: the same choice, the same numbers as the layer scaling its kernel."""
  with jax.enable_x64(True):
    x = jax.random.normal(KEY, (2, 64, 3), jnp.float64)
    layer = fnx.weight_norm(nnx.Conv(3, 4, (3,), param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    layer.kernel_g[...] = layer.kernel_g[...] * 1.7
    layer.bias[...] = jnp.linspace(-1.0, 1.0, 4)
    graphdef, state = nnx.split(layer)
    call = lambda s, x: nnx.merge(graphdef, s)(x)
    assert len(_kernel_sized_muls(lambda s: call(s, x), state, (3, 3, 4))) == 1
    assert not _kernel_sized_muls(lambda s: call(s, x[:, :2]), state, (3, 3, 4))
    v, g = layer.kernel_v[...], layer.kernel_g[...]
    kernel = v * g / jnp.sqrt(jnp.sum(v * v, axis=(0, 1), keepdims=True))
    want = jax.lax.conv_general_dilated(
      x, kernel, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    chex.assert_trees_all_close(call(state, x), want + layer.bias[...], atol=1e-12)


@pytest.mark.parametrize(
  "layer, x_shape, kernel_side",
  [
    (nn.Dense(4), (8, 4), False),  # output 2x the kernel: a Dense keeps the output side
    (nn.Dense(4), (16, 4), True),  # 4x: past KERNEL_SIDE_RATIO
    (nn.Conv(4, (3,)), (1, 4, 3), False),  # output 0.44x the kernel
    (nn.Conv(4, (3,)), (1, 7, 3), True),  # 0.78x: past CONV_KERNEL_SIDE_RATIO
  ],
)
def test_threshold_per_layer_kind(layer, x_shape, kernel_side):
  """A Dense takes the kernel side past 3x its kernel, a convolution past 0.5x."""
  x = jnp.ones(x_shape)
  wrapped = flaxnorm.weight_norm(layer)
  variables = wrapped.init(KEY, x)
  shape = variables["params"]["kernel_v"].shape
  muls = _kernel_sized_muls(lambda v: wrapped.apply(v, x), variables, shape)
  assert len(muls) == int(kernel_side)


def test_operator_mode_keeps_the_output_side():
  """Operator mode runs the layer on the raw kernel: its scale stays on the output."""
  x = jnp.ones((2, 64, 3))  # output 14x the kernel: kernel mode takes the kernel side
  for operator, kernel_side in ((False, True), (True, False)):
    layer = flaxnorm.spectral_norm(nn.Conv(4, (3,)), operator=operator)
    variables = layer.init(KEY, x)
    apply = lambda v: layer.apply(v, x, mutable=True)
    assert len(_kernel_sized_muls(apply, variables, (3, 3, 4))) == int(kernel_side)
  model = fnx.spectral_norm(
    nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)), operator=True, input_shape=(64, 3)
  )
  graphdef, state = nnx.split(model)
  assert not _kernel_sized_muls(lambda s: nnx.merge(graphdef, s)(x), state, (3, 3, 4))


class _Stack(nn.Module):
  """Three bfloat16 layers, each wrapped: 128-feature Dense layers or 3x3 convolutions."""

  wrap: object
  conv: bool = False

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
      layer = nn.Conv(64, (3, 3), strides=2, **kw) if self.conv else nn.Dense(128, **kw)
      x = nn.relu(self.wrap(layer)(x))  # pyright: ignore[reportCallIssue]
    return x


def _step_peak(wrap, x, conv=False) -> tuple[int, int]:
  """(peak bytes of a compiled SGD step, bytes of the kernels)."""
  net = _Stack(wrap, conv)
  variables = net.init(KEY, x)

  def step(variables):
    def loss(p):
      y, _ = net.apply({**variables, "params": p}, x, mutable=["spectral"])
      return y.astype(jnp.float32).sum()

    grads = jax.grad(loss)(variables["params"])
    return jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)

  m = jax.jit(step).lower(variables).compile().memory_analysis()
  kernels = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
    if path[-1].key in ("kernel", "kernel_v")  # plain and SN: kernel; WN: kernel_v (not _g)
  ]
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return peak - m.alias_size_in_bytes, sum(a.nbytes for a in kernels)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's buffer assignment")
@pytest.mark.parametrize("wrap", [flaxnorm.weight_norm, flaxnorm.spectral_norm])
def test_bfloat16_output_side_keeps_no_float32_outputs(wrap):
  """A bfloat16 layer's output scale keeps no float32 output-sized buffer for the backward.

  Output 1x the kernel (a Dense keeps the output side). What the scale's
  gradient needs is the bfloat16 unscaled output (here 1x the kernels' bytes
  over the plain step). Without the barrier and the rematerialized widening in
  ``_output_scale._scaled``, XLA:CPU keeps each layer's float32 dot result
  instead: 2x.
  """
  x = jnp.ones((128, 128), jnp.bfloat16)
  plain, _ = _step_peak(lambda m: m, x)
  peak, kernel_bytes = _step_peak(wrap, x)
  assert peak - plain <= 1.5 * kernel_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's buffer assignment")
def test_bfloat16_operator_mode_keeps_no_float32_kernels():
  """Operator mode's sigma gradient keeps no float32 kernel-sized buffer for the backward.

  The gradient of ``sigma = <w, G>`` is ``G``, recomputed in the backward from
  ``ct * u`` (``_operator._inner_bwd``). Kept from the forward instead, it is a
  float32 kernel per layer (2.49x the bfloat16 kernels' bytes over the plain
  step here, against 1.42x: the rest is the state's float32 ``u`` and ``v`` and
  the bfloat16 outputs the output side keeps).
  """
  x = jnp.ones((8, 16, 16, 64), jnp.bfloat16)
  plain, _ = _step_peak(lambda m: m, x, conv=True)
  # (One init iteration: the step's buffers do not depend on them, and 200 take 40 s here.)
  wrap = lambda m: flaxnorm.spectral_norm(m, operator=True, n_init_iterations=1)
  peak, kernel_bytes = _step_peak(wrap, x, conv=True)
  assert peak - plain <= 2.0 * kernel_bytes


def _remat_inputs(grad_fn, arg, shape) -> list[list[str]]:
  """For each rematerialized product in ``grad_fn``: the dtypes of its ``shape``-d inputs."""
  found = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name.startswith(("remat", "checkpoint")):
        found.append(sorted(str(v.aval.dtype) for v in e.invars if v.aval.shape == shape))
      for p in e.params.values():
        for sub in p if isinstance(p, tuple) else (p,):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            walk(getattr(sub, "jaxpr", sub))

  walk(jax.make_jaxpr(grad_fn)(arg).jaxpr)
  return found


@pytest.mark.parametrize("operator", [False, True])
def test_bfloat16_kernel_cotangent_width(operator):
  """A bfloat16 kernel scaled in float32 takes its cotangent wide, in operator mode narrow.

  Wide, XLA skips rounding the kernel's float32 gradient to bfloat16 and back
  (about 1% of the suite's bfloat16 discriminator step); narrow, the buffer it
  holds until the scale's gradient is known is half as large, which operator
  mode's step, holding more kernel-sized buffers, keeps within its memory target.
  """
  x = jnp.ones((2, 64, 3), jnp.bfloat16)  # output 14x the kernel: the kernel side
  kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  layer = flaxnorm.spectral_norm(nn.Conv(4, (3,), **kw), operator=operator)
  variables = layer.init(KEY, x)

  def linen_loss(params):
    y, _ = layer.apply({**variables, "params": params}, x, mutable=["spectral"])
    return y.astype(jnp.float32).sum()

  model = fnx.spectral_norm(
    nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0), **kw),
    operator=operator,
    **({"input_shape": (64, 3)} if operator else {}),
  )
  graphdef, state = nnx.split(model)
  nnx_loss = lambda m: m(x).astype(jnp.float32).sum()
  nnx_grad = lambda s: nnx.grad(nnx_loss)(nnx.merge(graphdef, s))
  want = [sorted(["bfloat16", "bfloat16" if operator else "float32"])]
  assert _remat_inputs(jax.grad(linen_loss), variables["params"], (3, 3, 4)) == want
  assert _remat_inputs(nnx_grad, state, (3, 3, 4)) == want
