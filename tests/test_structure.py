"""The library's shape: options checked once, one subclass mechanism, pickling, the tree's
bound forms, and a documented public API (every public callable has a runnable example)."""

import inspect
import pickle

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.interop
import flaxnorm.nnx as fnx
import flaxnorm.tree as ft
from flaxnorm import _subclass

KEY = jax.random.key(0)
X = jnp.ones((2, 4))
PUBLIC_MODULES = (flaxnorm, fnx, ft, flaxnorm.interop)


# --------------------------------------------------------------------------- #
# Options: one canonical value per setting, one class per (layer, options).
# --------------------------------------------------------------------------- #


def test_equal_options_give_the_same_class():
  a = flaxnorm.weight_norm(nn.Dense, axis=[0])
  b = flaxnorm.weight_norm(nn.Dense, axis=(0,))
  assert a is b
  assert flaxnorm.spectral_norm(nn.Dense, eps=1e-6) is flaxnorm.spectral_norm(nn.Dense, eps=1e-6)
  assert flaxnorm.spectral_norm(nn.Dense, eps=1e-6) is not flaxnorm.spectral_norm(nn.Dense)


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: flaxnorm.weight_norm(nn.Dense, recursive=1), TypeError, "recursive must be a bool at weight_norm"),
    (lambda: flaxnorm.spectral_norm(nn.Dense, collection=""), TypeError, "collection must be a non-empty str at spectral_norm"),
    (lambda: fnx.spectral_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), mode="x"), ValueError, "mode must be one of .* at spectral_norm"),
    (lambda: ft.spectral_norm(eps=0.0), ValueError, "eps must be a positive finite float at flaxnorm.tree.spectral_norm"),
    (lambda: ft.weight_norm(axis="x"), TypeError, "flaxnorm.tree.weight_norm: axis must be"),
    (lambda: ft.spectral_norm(name=["kernel", "kernel"]), ValueError, "lists \\['kernel'\\] more than once"),
  ],
)  # fmt: skip
def test_options_are_checked_where_they_are_given(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_spectral_normalize_names_itself_in_errors():
  w = jnp.ones((3, 2))
  with pytest.raises(ValueError, match=r"mode must be one of .* at spectral_normalize"):
    flaxnorm.spectral_normalize(w, jnp.ones(2), jnp.ones(3), mode="bad")


def test_nnx_wrong_state_shape_is_named():
  layer = fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  layer.kernel_v = fnx.SpectralStateVar(jnp.ones(5))
  with pytest.raises(
    ValueError,
    match=r"stored state of param 'kernel' of Linear does not fit the param of shape \(4, 3\): "
    r"expected kernel_u of shape \(3,\) and kernel_v of shape \(4,\).*got \(3,\) and \(5,\)",
  ):
    layer(X)


def test_top_level_is_named_alike_in_every_face():
  with pytest.raises(ValueError, match="<top level>"):
    ft.spectral_norm_apply({"kernel": jnp.ones((2, 2))}, {"kernel_u": jnp.ones(2)}, update=False)


# --------------------------------------------------------------------------- #
# Pickling: a wrapped module pickles like the plain one.
# --------------------------------------------------------------------------- #


def _normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, dtype)  # module-level: picklable, unlike Flax's defaults


@pytest.mark.parametrize("transform", [flaxnorm.weight_norm, flaxnorm.spectral_norm])
def test_linen_wrapped_modules_pickle(transform):
  plain = nn.Dense(3, kernel_init=_normal, bias_init=_normal)
  pickle.dumps(plain)  # the plain layer pickles, so the wrapped one must
  layer = transform(plain)
  variables = layer.init(KEY, X)
  again = pickle.loads(pickle.dumps(layer))
  assert type(again) is type(layer)
  chex.assert_trees_all_close(again.apply(variables, X), layer.apply(variables, X))
  cls = transform(nn.Conv)
  assert type(pickle.loads(pickle.dumps(cls(2, (3,), kernel_init=_normal)))) is cls


def test_nnx_wrapped_modules_pickle():
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs))
  fnx.weight_norm(model.layers[0])
  fnx.spectral_norm(model.layers[1])
  model.eval()
  again = pickle.loads(pickle.dumps(model))
  assert [type(m) for m in again.layers] == [type(m) for m in model.layers]
  chex.assert_trees_all_close(again(X), model(X))


def test_nnx_graphdef_pickles(monkeypatch):
  # An NNX GraphDef holds the normalized class itself; until 2026-12-06 pickle
  # looked it up by name and found the base ("not the same object").
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
  fnx.weight_norm(model.layers[0])
  fnx.spectral_norm(model.layers[1])
  model.eval()
  graphdef, state = nnx.split(model)
  blob = pickle.dumps(graphdef)
  assert pickle.loads(blob) == graphdef
  monkeypatch.setattr(_subclass, "_CACHE", {})  # as in a new process: the classes are rebuilt
  again = nnx.merge(pickle.loads(blob), state)
  for old, new in zip(model.layers, again.layers):
    assert type(new) is not type(old) and _subclass.base_of(type(new)) is nnx.Linear
    assert _subclass.specs_of(type(new)) == _subclass.specs_of(type(old))
  chex.assert_trees_all_close(again(X), model(X))


class _UserConv(flaxnorm.spectral_norm(nn.Conv)):
  """A user's subclass of a normalized class: pickled by name, as any class."""


def test_classes_pickle():
  cls = flaxnorm.weight_norm(nn.Dense)
  assert pickle.loads(pickle.dumps(cls)) is cls
  assert pickle.loads(pickle.dumps(_UserConv)) is _UserConv
  assert pickle.loads(pickle.dumps(nn.Dense)) is nn.Dense  # other classes as before


# --------------------------------------------------------------------------- #
# The tree face: name= like the other faces, and bound forms equal to the functions.
# --------------------------------------------------------------------------- #


def _params():
  k1, k2 = jax.random.split(KEY)
  return {
    "a": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
    "b": {"weight": jax.random.normal(k2, (3, 5))},
  }


def test_tree_name_and_names_agree():
  params = _params()
  chex.assert_trees_all_equal(
    ft.weight_norm_init(params, name="weight", axis=0),
    ft.weight_norm_init(params, names="weight", axis=0),
  )
  with pytest.raises(TypeError, match="not both"):
    ft.weight_norm_init(params, name="weight", names="weight")


def test_tree_bound_forms_equal_the_functions():
  params = _params()
  wn = ft.weight_norm(name=("kernel", "weight"), axis=None)
  wn_params = wn.init(params)
  chex.assert_trees_all_equal(
    wn_params, ft.weight_norm_init(params, name=("kernel", "weight"), axis=None)
  )
  chex.assert_trees_all_close(wn.apply(wn_params), params, atol=1e-6)

  sn = ft.spectral_norm(
    name="weight", axis=0, n_power_iterations=3, n_init_iterations=2, mode="clip"
  )
  state = sn.init(params, KEY)
  chex.assert_trees_all_equal(
    state, ft.spectral_norm_init(params, KEY, name="weight", axis=0, n_init_iterations=2)
  )
  for update in (True, False):
    got = sn.apply(params, state, update=update)
    want = ft.spectral_norm_apply(
      params, state, update=update, axis=0, n_power_iterations=3, mode="clip"
    )
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize(
  "make",
  [
    lambda: ft.weight_norm(axis="auto"),
    lambda: ft.spectral_norm(axis="auto"),
    lambda: ft.spectral_norm(axis="x"),
    lambda: ft.weight_norm_init({"kernel": jnp.ones((2, 2))}, axis={"a": 0}),
  ],
)
def test_tree_refuses_layer_axes_when_the_options_are_given(make):
  # A tree has no layer to read the output axes from. Until 2026-12-06 the
  # bound forms took 'auto' and failed only at init, and 'x' was told that
  # 'auto' was allowed.
  with pytest.raises(TypeError, match=r"axis must be an int, a tuple of ints or None here"):
    make()


# --------------------------------------------------------------------------- #
# The public API: __all__ is exactly the API, and every callable shows how to use it.
# --------------------------------------------------------------------------- #


def _public(module):
  return [
    (name, getattr(module, name))
    for name in module.__all__
    if callable(getattr(module, name)) and not inspect.ismodule(getattr(module, name))
  ]


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_lists_only_what_exists(module):
  assert hasattr(module, "__all__")
  missing = [name for name in module.__all__ if not hasattr(module, name)]
  assert not missing
  stray = {"np", "jax", "jnp", "meta", "Axis", "Any", "Callable", "Mapping", "NamedTuple"}
  assert not stray & set(module.__all__)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_public_callable_has_an_example(module):
  undocumented = [
    name for name, obj in _public(module) if ">>> " not in (inspect.getdoc(obj) or "")
  ]
  assert not undocumented, f"{module.__name__}: no Examples doctest in {undocumented}"


@pytest.mark.parametrize(
  "fn",
  [
    flaxnorm.weight_norm,
    flaxnorm.spectral_norm,
    fnx.weight_norm,
    fnx.spectral_norm,
    ft.weight_norm,
    ft.spectral_norm,
    ft.weight_norm_init,
    ft.spectral_norm_init,
    flaxnorm.power_iteration,
    flaxnorm.spectral_normalize,
    flaxnorm.weight_norm_compose,
    flaxnorm.weight_norm_decompose,
  ],
)
def test_methods_cite_their_paper(fn):
  assert "References:" in inspect.getdoc(fn)
