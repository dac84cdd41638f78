"""Kept axes read from the layer (``axis="auto"``), axis mappings and callables, name selectors.

The reference for spectral norm is the layer itself: the largest singular
value of its dense Jacobian (one example), which for these linear layers is
the operator norm sigma must equal.
"""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx

KEY = jax.random.key(0)
N_INIT = 400  # converged for these small kernels


def _jacobian_norm(fn, x_shape) -> float:
  """The largest singular value of ``fn``'s Jacobian at one example of shape ``x_shape``."""
  x = jax.random.normal(jax.random.key(7), x_shape)
  jac = jax.jacobian(fn)(x)
  out_size = int(np.prod(jac.shape[: jac.ndim - len(x_shape)]))
  mat = np.asarray(jac, np.float64).reshape(out_size, -1)
  return float(np.linalg.svd(mat, compute_uv=False)[0])


def _linen_sigma_vs_jacobian(make, x_shape, **kwargs):
  layer = flaxnorm.spectral_norm(make(), n_init_iterations=N_INIT, **kwargs)
  variables = layer.init(KEY, jnp.ones((1, *x_shape)))
  plain = {"params": variables["params"]}
  true = _jacobian_norm(lambda x: make().apply(plain, x[None])[0], x_shape)
  return float(variables["spectral"]["kernel_sigma"]), true, variables


@pytest.mark.parametrize(
  "features, axis, x_shape",
  [((3, 4), (-2, -1), (5, 2)), ((2, 3), -1, (6,)), (5, (-3, -1), (2, 3, 4))],
)
def test_dense_general_sigma_is_the_layers_norm(features, axis, x_shape):
  sigma, true, variables = _linen_sigma_vs_jacobian(
    lambda: nn.DenseGeneral(features, axis=axis), x_shape
  )
  n_out = int(np.prod(features))
  assert variables["spectral"]["kernel_u"].shape == (n_out,)
  np.testing.assert_allclose(sigma, true, rtol=1e-4)


@pytest.mark.parametrize(
  "equation, shape, x_shape",
  [
    ("bd,dhk->bhk", (6, 2, 3), (6,)),  # two output axes after the input axis
    ("bd,hdk->bhk", (2, 6, 3), (6,)),  # output axes around the contracted one
    ("bxy,yxz->bz", (3, 2, 4), (2, 3)),  # two contracted axes, one output axis
  ],
)
def test_einsum_sigma_is_the_layers_norm(equation, shape, x_shape):
  sigma, true, _ = _linen_sigma_vs_jacobian(
    lambda: nn.Einsum(shape, equation, use_bias=False), x_shape
  )
  np.testing.assert_allclose(sigma, true, rtol=1e-4)


# Flax's attention projections: (submodule, its plain twin, input shape).
_HEADS, _HEAD_DIM, _D = 2, 3, 5
_PROJECTIONS = {
  "query": (lambda: nn.DenseGeneral((_HEADS, _HEAD_DIM)), (_D,)),
  "key": (lambda: nn.DenseGeneral((_HEADS, _HEAD_DIM)), (_D,)),
  "value": (lambda: nn.DenseGeneral((_HEADS, _HEAD_DIM)), (_D,)),
  "out": (lambda: nn.DenseGeneral(_D, axis=(-2, -1)), (_HEADS, _HEAD_DIM)),
}


def test_linen_attention_projections_sigma():
  attn = flaxnorm.spectral_norm(
    nn.MultiHeadDotProductAttention(num_heads=_HEADS, qkv_features=_HEADS * _HEAD_DIM),
    recursive=True,
    n_init_iterations=N_INIT,
  )
  variables = attn.init(KEY, jnp.ones((1, 4, _D)))
  for name, (make, x_shape) in _PROJECTIONS.items():
    params = {"params": variables["params"][name]}
    true = _jacobian_norm(lambda x: make().apply(params, x[None])[0], x_shape)
    sigma = float(variables["spectral"][name]["kernel_sigma"])
    np.testing.assert_allclose(sigma, true, rtol=1e-4, err_msg=name)


def test_nnx_attention_and_general_layers_sigma():
  attn = nnx.MultiHeadAttention(
    num_heads=_HEADS, in_features=_D, qkv_features=_HEADS * _HEAD_DIM, decode=False,
    rngs=nnx.Rngs(0),
  )  # fmt: skip
  plain = {n: getattr(attn, n).kernel[...] for n in _PROJECTIONS}
  fnx.wrap_modules(attn, fnx.spectral_norm, where=nnx.LinearGeneral, n_init_iterations=N_INIT)
  for name, (make, x_shape) in _PROJECTIONS.items():
    params = {"params": {"kernel": plain[name], "bias": jnp.zeros(make().features)}}
    true = _jacobian_norm(lambda x: make().apply(params, x[None])[0], x_shape)
    sigma = float(getattr(attn, name).kernel_sigma[...])
    np.testing.assert_allclose(sigma, true, rtol=1e-4, err_msg=name)
  # NNX Einsum reads its equation too.
  layer = nnx.Einsum("bd,hdk->bhk", (2, 6, 3), rngs=nnx.Rngs(1))
  w = layer.kernel[...]
  fnx.spectral_norm(layer, n_init_iterations=N_INIT)
  true = _jacobian_norm(lambda x: jnp.einsum("d,hdk->hk", x, w), (6,))
  np.testing.assert_allclose(float(layer.kernel_sigma[...]), true, rtol=1e-4)


def test_weight_norm_keeps_the_output_features():
  x = jax.random.normal(KEY, (2, 3, 5))
  layer = flaxnorm.weight_norm(nn.DenseGeneral((2, 4)))
  variables = layer.init(KEY, x)
  assert variables["params"]["kernel_g"].shape == (1, 2, 4)
  plain = flaxnorm.remove_weight_norm(variables)
  chex.assert_trees_all_close(layer.apply(variables, x), nn.DenseGeneral((2, 4)).apply(plain, x))
  emb = flaxnorm.weight_norm(nn.Embed(7, 4), name="embedding").init(KEY, jnp.array([1]))
  assert emb["params"]["embedding_g"].shape == (7, 1)  # PyTorch's dim=0 for Embedding
  # The old default on request.
  old = flaxnorm.weight_norm(nn.DenseGeneral((2, 4)), axis=-1).init(KEY, x)
  assert old["params"]["kernel_g"].shape == (1, 1, 4)
  lin = fnx.weight_norm(nnx.LinearGeneral(5, (2, 4), rngs=nnx.Rngs(0)))
  assert lin.kernel_g.shape == (1, 2, 4)
  assert fnx.weight_norm(nnx.Embed(7, 4, rngs=nnx.Rngs(0)), name="embedding").embedding_g.shape == (
    7,
    1,
  )


def test_output_scaling_of_a_general_layer_matches_the_kernel_path():
  """DenseGeneral's (1, heads, dim) scale moves to its (..., heads, dim) output."""

  class Sub(nn.DenseGeneral):  # a subclass takes the kernel path
    pass

  x = jax.random.normal(KEY, (2, 3, 5))
  fast = flaxnorm.weight_norm(nn.DenseGeneral((2, 4)))
  slow = flaxnorm.weight_norm(Sub((2, 4)))
  variables = fast.init(KEY, x)
  variables["params"]["kernel_g"] = variables["params"]["kernel_g"] * 1.7
  chex.assert_trees_all_close(fast.apply(variables, x), slow.apply(variables, x), rtol=1e-5)
  jaxpr = jax.make_jaxpr(lambda v: fast.apply(v, x))(variables)
  kernel_muls = [
    e for e in jaxpr.eqns if e.primitive.name == "mul" and e.outvars[0].aval.shape == (5, 2, 4)
  ]
  assert not kernel_muls  # the scale went to the output, not the kernel


def test_axis_mapping_and_callable_with_recursive():
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  q = jnp.ones((1, 3, 6))
  mapped = flaxnorm.weight_norm(attn, recursive=True, axis={"query": -1, "out": None})
  params = mapped.init(KEY, q)["params"]
  assert params["query"]["kernel_g"].shape == (1, 1, 4)  # mapped
  assert params["key"]["kernel_g"].shape == (1, 2, 4)  # "auto"
  assert params["out"]["kernel_g"].shape == ()  # one norm
  by_path = flaxnorm.weight_norm(
    nn.Sequential([attn]), recursive=True, axis={"layers_0/value": -1}
  ).init(KEY, q)["params"]["layers_0"]
  assert by_path["value"]["kernel_g"].shape == (1, 1, 4)
  called = flaxnorm.weight_norm(attn, recursive=True, axis=lambda m, name: -1)
  assert called.init(KEY, q)["params"]["key"]["kernel_g"].shape == (1, 1, 4)


def test_axis_errors():
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  q = jnp.ones((1, 3, 6))
  with pytest.raises(ValueError, match=r"names \['qery'\].*submodules are \['key', 'out'"):
    flaxnorm.weight_norm(attn, recursive=True, axis={"qery": -1}).init(KEY, q)
  with pytest.raises(ValueError, match="needs recursive=True"):
    flaxnorm.spectral_norm(nn.Dense(3), axis={"a": -1})
  with pytest.raises(TypeError, match=r"param 'kernel'.*axis callable .* returned 'x'"):
    flaxnorm.weight_norm(nn.Dense(3), axis=lambda m, n: "x").init(KEY, q)
  with pytest.raises(TypeError, match="'auto'"):
    flaxnorm.weight_norm(nn.Dense(3), axis="last")
  with pytest.raises(TypeError, match=r"axis\['query'\]"):
    flaxnorm.weight_norm(attn, recursive=True, axis={"query": "x"})
  with pytest.raises(ValueError, match=r"param 'kernel'.*'bd,d->b' contracts every kernel axis"):
    flaxnorm.weight_norm(nn.Einsum((4,), "bd,d->b", use_bias=False)).init(KEY, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"needs recursive=True .* or flaxnorm.nnx.wrap_modules"):
    fnx.weight_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), axis={"a": 0})
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"names \['head'\].*chosen modules are \['layers/0'\]"):
    fnx.wrap_modules(model, fnx.weight_norm, where=nnx.Linear, axis={"head": 0})
  with pytest.raises(TypeError, match="no layer to read"):
    flaxnorm.tree.weight_norm_init({"kernel": jnp.ones((3, 4))}, axis="auto")


def test_nnx_axis_mapping_by_name_and_path():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  fnx.wrap_modules(model, fnx.weight_norm, where=nnx.Linear, axis={"layers/1": 0})
  assert model.layers[0].kernel_g.shape == (1, 4)
  assert model.layers[1].kernel_g.shape == (4, 1)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(4)(x))
    return nn.Dense(2, name="head")(x)


def test_linen_name_predicate_and_regex_select_a_whole_block():
  x = jnp.ones((2, 3))
  by_rank = flaxnorm.weight_norm(_Block(), name=lambda path, p: p.ndim >= 2, recursive=True)
  params = by_rank.init(KEY, x)["params"]
  assert sorted(params["Dense_0"]) == ["bias", "kernel_g", "kernel_v"]
  assert sorted(params["LayerNorm_0"]) == ["bias", "scale"]  # left alone
  by_regex = flaxnorm.spectral_norm(_Block(), name=re.compile(r"^head/kernel$"), recursive=True)
  variables = by_regex.init(KEY, x)
  assert list(variables["spectral"]) == ["head"]
  by_regex.apply(variables, x, mutable=["spectral"])
  plain = flaxnorm.remove_spectral_norm(variables)
  chex.assert_trees_all_close(by_regex.apply(variables, x), _Block().apply(plain, x), rtol=1e-6)
  # lipschitz_bound(model=) finds selector-wrapped layers.
  bound = flaxnorm.lipschitz_bound(variables, model=by_regex, inputs=(x,))
  assert "head/kernel" in bound.layers


def test_name_selector_errors():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"matched no param .*\['Dense_0/bias', 'Dense_0/kernel'"):
    flaxnorm.weight_norm(_Block(), name=re.compile("nope"), recursive=True).init(KEY, x)
  both = flaxnorm.spectral_norm(flaxnorm.weight_norm(nn.Dense(3)), name=re.compile("kernel"))
  with pytest.raises(ValueError, match=r"selected by .*normalized only once"):
    both.init(KEY, x)
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"matched no param .*\['layers/0/bias'"):
    fnx.wrap_modules(model, fnx.weight_norm, where=lambda p, m: True, name=re.compile("nope"))
  with pytest.raises(ValueError, match=r"matched no param of Linear. Its params are \['bias'"):
    fnx.weight_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), name=re.compile("nope"))


def test_nnx_and_tree_selectors():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
  fnx.wrap_modules(model, fnx.spectral_norm, where=lambda p, m: True, name=lambda p, w: w.ndim > 1)
  assert sorted(fnx.spectral_sigmas(model)) == ["layers/0/kernel"]
  assert type(model.layers[1]) is nnx.LayerNorm
  params = {
    "a": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "b": {"kernel": jnp.ones((4, 2))},
  }
  wn = flaxnorm.tree.weight_norm_init(params, name=re.compile(r"^a/kernel$"))
  assert sorted(wn["a"]) == ["bias", "kernel_g", "kernel_v"] and sorted(wn["b"]) == ["kernel"]


@pytest.mark.parametrize("seed", range(6))
def test_removal_reads_the_axes_of_square_kernels(seed):
  """Square views (default attention, a square Dense): the iterated view is found for any seed.

  The view power iteration left ``u = W v / ||W v||`` in fits to rounding; the
  transposed one fits by chance, often 0.5-0.9 for small random kernels (seeds
  1 and 2 of the Dense here raised before 2026-12-05).
  """
  key = jax.random.key(seed)
  x = jax.random.normal(key, (2, 3, 8))
  attention = nn.MultiHeadDotProductAttention(num_heads=2)  # query/key/value/out views 8x8
  dense = nn.Dense(8)
  for layer in (attention, dense):
    wrapped = flaxnorm.spectral_norm(layer, recursive=True)
    variables = jax.jit(wrapped.init)(key, x)
    update = jax.jit(functools.partial(wrapped.apply, mutable=["spectral"]))
    variables = {**variables, **update(variables, x)[1]}
    variables["params"] = jax.tree.map(lambda p: p * 1.01 + 1e-3, variables["params"])  # a step
    plain = flaxnorm.remove_spectral_norm(variables)
    chex.assert_trees_all_close(
      layer.apply(plain, x), wrapped.apply(variables, x), rtol=1e-5, atol=1e-6
    )
  diagonal = jnp.diag(jnp.arange(1.0, 5.0))  # both views fold alike: either will do
  symmetric = nn.Dense(4, use_bias=False, kernel_init=lambda *_: diagonal)
  variables = flaxnorm.spectral_norm(symmetric).init(key, x[0, :, :4])
  plain = flaxnorm.remove_spectral_norm(variables)
  chex.assert_trees_all_close(plain["params"]["kernel"], diagonal / 4, rtol=1e-6)


def test_removal_reads_the_axes_from_the_state():
  x = jax.random.normal(KEY, (2, 4))
  for layer, inputs in [
    (nn.DenseGeneral((2, 3)), x),
    (nn.Embed(4, 4), jnp.array([0, 3])),  # square: the state's alignment decides
  ]:
    name = "embedding" if isinstance(layer, nn.Embed) else "kernel"
    wrapped = flaxnorm.spectral_norm(layer, name=name)
    variables = wrapped.init(KEY, inputs)
    variables = {**variables, **wrapped.apply(variables, inputs, mutable=["spectral"])[1]}
    variables["params"] = jax.tree.map(lambda p: p * 1.01, variables["params"])  # a step
    plain = flaxnorm.remove_spectral_norm(variables)
    chex.assert_trees_all_close(
      layer.apply(plain, inputs), wrapped.apply(variables, inputs), rtol=1e-6
    )
  square = flaxnorm.spectral_norm(nn.Dense(4), n_init_iterations=0)
  with pytest.raises(ValueError, match=r"cannot tell .* pass axis="):
    flaxnorm.remove_spectral_norm(square.init(KEY, x))
  flaxnorm.remove_spectral_norm(square.init(KEY, x), axis=-1)  # given: fine


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_keeps_its_output_axis(transpose_kernel):
  """``transpose_kernel=True`` lays the kernel out ``(*window, out, in)``: ``"auto"`` keeps ``-2``."""
  x = jax.random.normal(KEY, (2, 5, 2))
  layer = nn.ConvTranspose(3, (3,), transpose_kernel=transpose_kernel)
  wn = flaxnorm.weight_norm(layer)
  variables = wn.init(KEY, x)
  g_shape = (1, 3, 1) if transpose_kernel else (1, 1, 3)  # one norm per output feature
  assert variables["params"]["kernel_g"].shape == g_shape
  plain = flaxnorm.remove_weight_norm(variables)
  chex.assert_trees_all_close(layer.apply(plain, x), wn.apply(variables, x), rtol=1e-6)
  sn = flaxnorm.spectral_norm(layer).init(KEY, x)["spectral"]
  assert sn["kernel_u"].shape == (3,) and sn["kernel_v"].shape == (6,)
  linear = nnx.ConvTranspose(2, 3, (3,), transpose_kernel=transpose_kernel, rngs=nnx.Rngs(0))
  assert fnx.weight_norm(linear).kernel_g.shape == g_shape
