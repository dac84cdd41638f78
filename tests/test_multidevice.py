"""Sharding and SPMD on 8 simulated CPU devices.

Run in its own process (the device count is fixed when JAX starts)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -m multidevice tests

Meshes use ``AxisType.Auto``: Flax Linen's ``nn.with_partitioning`` asserts
its sharding at init under ``Explicit`` axes (``jax.make_mesh``'s default),
for a plain ``nn.Dense`` as much as for a wrapped one.
"""

from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flaxnorm

pytestmark = pytest.mark.multidevice

if jax.device_count() < 8:
  pytest.skip(
    "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
    allow_module_level=True,
  )

KEY = jax.random.key(0)
LECUN = nn.initializers.lecun_normal()
TOL = {"rtol": 0, "atol": 1e-5}


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _part(names, init=LECUN):
  return nn.with_partitioning(init, names)


def _specs(tree):
  return jax.tree.map(lambda a: a.sharding.spec, tree)


def _init(module, x, shardings=None):
  # Jitted: eager init dispatches the 200 init power iterations op by op.
  return jax.jit(lambda k: nn.meta.unbox(module.init(k, x)), out_shardings=shardings)(KEY)


def _shardings(mesh, boxed):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), nn.get_partition_spec(boxed))


def _assert_trees_close(actual, expected, **tol):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL)),
    actual,
    expected,
  )


def _assert_replicated_over(arr, mesh, axis):
  """Every device along ``axis`` holds a bit-identical copy of its shard."""
  assert axis not in jax.tree.leaves(tuple(arr.sharding.spec)), arr.sharding
  copies = defaultdict(list)
  for shard in arr.addressable_shards:
    copies[tuple((s.start, s.stop) for s in shard.index)].append(np.asarray(shard.data))
  for group in copies.values():
    assert len(group) >= mesh.shape[axis]
    for copy in group[1:]:
      np.testing.assert_array_equal(copy, group[0])


# --------------------------------------------------------------------------- #
# Partition metadata of the new variables
# --------------------------------------------------------------------------- #

# (layer, input shape, wrap kwargs, kernel names, expected WN g names, expected SN u spec)
CASES = {
  "dense_out": (
    lambda: nn.Dense(8, kernel_init=_part((None, "model"))),
    (4, 6),
    {},
    (None, "model"),
    (None, "model"),
    P("model"),
  ),
  "dense_in": (
    lambda: nn.Dense(8, kernel_init=_part(("model", None))),
    (4, 6),
    {},
    ("model", None),
    (None, None),
    P(None),
  ),
  "conv": (
    lambda: nn.Conv(4, (3,), kernel_init=_part((None, None, "model"))),
    (4, 5, 3),
    {},
    (None, None, "model"),
    (None, None, "model"),
    P("model"),
  ),
  "embed": (
    lambda: nn.Embed(6, 4, embedding_init=_part(("model", None))),
    None,
    {"name": "embedding", "axis": 0},
    ("model", None),
    ("model", None),
    P("model"),
  ),
  # Two kept axes: u has no single axis name, so it is replicated.
  "dense_general": (
    lambda: nn.DenseGeneral((2, 4), kernel_init=_part((None, "model", None))),
    (4, 6),
    {"axis": (-2, -1)},
    (None, "model", None),
    (None, "model", None),
    P(None),
  ),
}


def _case_input(shape):
  if shape is None:
    return jnp.array([[0, 3, 5], [1, 1, 2], [4, 0, 0], [2, 5, 3]])
  return jax.random.normal(jax.random.key(1), shape)


class Pair(nn.Module):
  """The case's layer twice: with weight norm, then with spectral norm."""

  kind: str

  @nn.compact
  def __call__(self, x):
    make, _, kw, *_ = CASES[self.kind]
    return flaxnorm.weight_norm(make(), **kw)(x), flaxnorm.spectral_norm(make(), **kw)(x)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_partition_metadata_and_sharded_jit(kind):
  _, shape, kw, k_names, g_names, u_spec = CASES[kind]
  x = _case_input(shape)
  model = Pair(kind)
  name = kw.get("name", "kernel")
  boxed = jax.eval_shape(model.init, KEY, x)
  specs = nn.get_partition_spec(boxed)
  wn, sn = sorted(specs["params"])  # e.g. Dense_0, Dense_1
  # WN: v like the kernel, g sharded like it on the kept axis only.
  assert specs["params"][wn][f"{name}_v"] == P(*k_names)
  assert specs["params"][wn][f"{name}_g"] == P(*g_names)
  # SN: the kernel keeps its names; u follows the kept axis.
  assert specs["params"][sn][name] == P(*k_names)
  expected = {f"{name}_u": u_spec, f"{name}_v": P(None), f"{name}_sigma": P()}
  assert specs["spectral"] == {sn: expected}

  mesh = _mesh((4, 2), ("data", "model"))
  shardings = _shardings(mesh, boxed)
  variables = _init(model, x, shardings)
  assert _specs(variables) == specs
  reference = _init(model, x)
  _assert_trees_close(variables, reference)

  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  train = jax.jit(
    lambda v, x: model.apply(v, x, mutable=["spectral"]),
    out_shardings=(None, {"spectral": shardings["spectral"]}),
  )
  out = train(variables, x_sharded)
  _assert_trees_close(out, model.apply(reference, x, mutable=["spectral"]))
  for arr in jax.tree.leaves(out[1]):
    _assert_replicated_over(arr, mesh, "data")
  _assert_trees_close(jax.jit(model.apply)(variables, x_sharded), model.apply(reference, x))


@pytest.mark.parametrize("kind", ["dense_in", "dense_out"])
def test_explicit_mesh_training_step(kind):
  """Under ``jax.make_mesh``'s default ``Explicit`` axes, with params placed by
  ``device_put`` (init itself fails there for plain Flax layers as well).

  Only Dense kernels: a plain ``nn.Conv``, ``nn.Embed`` or ``nn.DenseGeneral``
  with sharded kernels already fails under Explicit axes in Flax itself.
  """
  _, shape, *_ = CASES[kind]
  x = _case_input(shape)
  model = Pair(kind)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  reference = _init(model, x)
  variables = jax.device_put(reference, _shardings(mesh, jax.eval_shape(model.init, KEY, x)))

  def loss_fn(params, variables, x):
    (y_wn, y_sn), updates = model.apply({**variables, "params": params}, x, mutable=["spectral"])
    return jnp.sum(y_wn**2) + jnp.sum(y_sn**2), updates

  step = jax.value_and_grad(loss_fn, has_aux=True)
  expected = jax.jit(step)(reference["params"], reference, x)
  with jax.set_mesh(mesh):
    out = jax.jit(step)(
      variables["params"], variables, jax.device_put(x, NamedSharding(mesh, P("data")))
    )
  _assert_trees_close(out, expected)
  # Outside `jax.set_mesh` as well (the arrays carry their mesh): until 2026-12-05
  # power iteration asked for a bare PartitionSpec there, which JAX refuses.
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  _assert_trees_close(jax.jit(step)(variables["params"], variables, x_sharded), expected)
  # Gradients and the new state keep the params' and the state's shardings.
  same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim)
  assert all(jax.tree.leaves(jax.tree.map(same, out[1], variables["params"])))
  assert all(jax.tree.leaves(jax.tree.map(same, out[0][1]["spectral"], variables["spectral"])))


# --------------------------------------------------------------------------- #
# Training: jit with NamedShardings vs one device
# --------------------------------------------------------------------------- #


class MLP(nn.Module):
  """WN and SN layers with model-parallel kernels, both ways round."""

  @nn.compact
  def __call__(self, x):
    x = flaxnorm.weight_norm(nn.Dense(16, kernel_init=_part((None, "model"))))(x)
    x = flaxnorm.spectral_norm(nn.Dense(16, kernel_init=_part((None, "model"))))(nn.tanh(x))
    return flaxnorm.spectral_norm(nn.Dense(4, kernel_init=_part(("model", None))))(nn.tanh(x))


MODEL = MLP()
OPT = optax.adam(1e-2)
X = jax.random.normal(jax.random.key(1), (16, 8))
T = jax.random.normal(jax.random.key(2), (16, 4))
N_STEPS = 3


def _local_step(params, spectral, opt_state, x, t, reduce=None):
  """One adam step; ``reduce`` averages the gradients over data-parallel replicas."""

  def loss_fn(params):
    y, updates = MODEL.apply({"params": params, "spectral": spectral}, x, mutable=["spectral"])
    return jnp.mean((y - t) ** 2), updates["spectral"]

  (loss, spectral), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if reduce is not None:
    grads, loss = reduce((grads, loss))
  updates, opt_state = OPT.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), spectral, opt_state, loss


def _train(step, carry, x, t):
  """Runs ``N_STEPS`` steps from ``carry = (params, spectral, opt_state)``."""
  losses = []
  for _ in range(N_STEPS):
    *carry, loss = step(*carry, x, t)
    losses.append(loss)
  return carry[0], carry[1], jnp.stack(losses)


def _on_mesh(mesh, tree):
  """Leaves already on ``mesh`` stay as they are; the others are replicated on it."""
  replicated = NamedSharding(mesh, P())
  on_mesh = lambda a: isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
  return jax.tree.map(lambda a: a if on_mesh(a) else jax.device_put(a, replicated), tree)


def _pinned_jit(fn, carry, loss_sharding):
  # Outputs sharded like the inputs, so every step reuses the first compile.
  return jax.jit(fn, out_shardings=(*jax.tree.map(lambda a: a.sharding, carry), loss_sharding))


@pytest.fixture(scope="module")
def single_device_run():
  variables = _init(MODEL, X)
  params = variables["params"]
  return _train(jax.jit(_local_step), (params, variables["spectral"], OPT.init(params)), X, T)


def test_jit_data_and_model_parallel_training_matches_single_device(single_device_run):
  mesh = _mesh((4, 2), ("data", "model"))
  boxed = jax.eval_shape(MODEL.init, KEY, X)
  variables = _init(MODEL, X, _shardings(mesh, boxed))
  params = variables["params"]
  # Adam's moments follow the params' shardings; its step count is replicated.
  carry = _on_mesh(mesh, (params, variables["spectral"], OPT.init(params)))
  step = _pinned_jit(_local_step, carry, NamedSharding(mesh, P()))
  data = NamedSharding(mesh, P("data"))
  out = _train(step, carry, jax.device_put(X, data), jax.device_put(T, data))

  _assert_trees_close(out, single_device_run)
  assert _specs(out[0]) == nn.get_partition_spec(boxed)["params"]
  # u of the second layer is sharded along "model", replicated along "data".
  assert out[1]["Dense_1"]["kernel_u"].sharding.spec == P("model")
  for arr in jax.tree.leaves(out[1]):
    _assert_replicated_over(arr, mesh, "data")


# --------------------------------------------------------------------------- #
# shard_map: data parallel, params and spectral state replicated
# --------------------------------------------------------------------------- #


def test_shard_map_each_replica_keeps_the_same_state(single_device_run):
  """Every replica carries its own params, optimizer and spectral state.

  Stacked on a leading "data" axis, so nothing forces the copies to agree: the
  spectral update depends only on the (pmean-synchronized) params and the
  previous state, so each replica computes the same bits. Classic pmap-style
  gradient averaging (``check_vma=False``, gradients ``lax.pmean``ed).
  """
  mesh = _mesh((8,), ("data",))
  variables = _init(MODEL, X)
  params = variables["params"]
  carry = (params, variables["spectral"], OPT.init(params))
  per_replica = NamedSharding(mesh, P("data"))
  stacked = jax.device_put(
    jax.tree.map(lambda a: jnp.broadcast_to(a, (8, *jnp.shape(a))), carry), per_replica
  )

  def replica_step(params, spectral, opt_state, x, t):
    own = jax.tree.map(lambda a: a[0], (params, spectral, opt_state))
    out = _local_step(*own, x, t, reduce=lambda tree: lax.pmean(tree, "data"))
    return jax.tree.map(lambda a: a[None], out)

  step = _pinned_jit(
    jax.shard_map(
      replica_step, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False
    ),
    stacked,
    per_replica,
  )
  params, spectral, losses = _train(step, stacked, X, T)

  for tree in (params, spectral, losses.T):
    for arr in jax.tree.leaves(tree):
      arr = np.asarray(arr)  # (replica, ...)
      for replica in arr[1:]:
        np.testing.assert_array_equal(replica, arr[0])
  first = jax.tree.map(lambda a: a[0], (params, spectral))
  _assert_trees_close((*first, losses[:, 0]), single_device_run)


@pytest.mark.parametrize("mesh_shape", [(8,), (4, 2)], ids=["data8", "data4_model2"])
def test_shard_map_check_vma_proves_state_replicated(single_device_run, mesh_shape):
  """With ``check_vma=True``, ``out_specs=P()`` for the spectral state only traces
  if JAX's type system proves it the same on every "data" replica.

  Under ``check_vma`` the gradient of a replicated param is already summed
  over replicas by AD, so the loss is ``pmean``ed, not the gradients
  (``pmean`` of the gradients would leave them 8x too large). The 2-D case
  is manual over "data" only, with model-parallel kernels left to the
  compiler.
  """
  names = ("data", "model")[: len(mesh_shape)]
  mesh = _mesh(mesh_shape, names)
  boxed = jax.eval_shape(MODEL.init, KEY, X)
  shardings = _shardings(mesh, boxed) if "model" in names else None
  variables = _init(MODEL, X, shardings)
  params = variables["params"]

  def replica_step(params, spectral, opt_state, x, t):
    def loss_fn(params):
      y, updates = MODEL.apply({"params": params, "spectral": spectral}, x, mutable=["spectral"])
      return lax.pmean(jnp.mean((y - t) ** 2), "data"), updates["spectral"]

    (loss, spectral), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), spectral, opt_state, loss

  carry = _on_mesh(mesh, (params, variables["spectral"], OPT.init(params)))
  step = _pinned_jit(
    jax.shard_map(
      replica_step,
      mesh=mesh,
      in_specs=(P(), P(), P(), P("data"), P("data")),
      out_specs=P(),
      axis_names={"data"},
    ),
    carry,
    NamedSharding(mesh, P()),
  )
  out = _train(step, carry, X, T)
  _assert_trees_close(out, single_device_run)
  for arr in jax.tree.leaves(out[1]):
    _assert_replicated_over(arr, mesh, "data")

  # The check has teeth: a state that depends on the local batch is refused.
  def leaky_step(params, spectral, opt_state, x, t):
    params, spectral, opt_state, loss = replica_step(params, spectral, opt_state, x, t)
    return params, jax.tree.map(lambda s: s + jnp.mean(x), spectral), opt_state, loss

  leaky = jax.shard_map(
    leaky_step,
    mesh=mesh,
    in_specs=(P(), P(), P(), P("data"), P("data")),
    out_specs=P(),
    axis_names={"data"},
  )
  with pytest.raises(ValueError, match="out_specs"):
    jax.jit(leaky).lower(*carry, X, T)


# --------------------------------------------------------------------------- #
# NNX: sharding names on every new variable, sharded init by the NNX recipe
# --------------------------------------------------------------------------- #


def _nnx_model():
  from flax import nnx

  import flaxnorm.nnx as fnx

  init = nnx.with_partitioning(LECUN, (None, "model"))
  wn = fnx.weight_norm(nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0)))
  sn = fnx.spectral_norm(nnx.Linear(16, 16, kernel_init=init, rngs=nnx.Rngs(1)))
  return nnx.Sequential(wn, nnx.tanh, sn)


def test_nnx_sharded_init_places_the_new_variables():
  """``nnx.get_partition_spec`` names g and u by the kernel's kept axis, as Linen does."""
  from flax import nnx

  mesh = _mesh((4, 2), ("data", "model"))

  @nnx.jit
  def create():
    model = _nnx_model()
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model

  with jax.set_mesh(mesh):
    model = create()
  wn, sn = model.layers[0], model.layers[2]
  assert wn.kernel_g[...].sharding.spec == P(None, "model")
  assert wn.kernel_v[...].sharding.spec == P(None, "model")
  assert sn.kernel_u[...].sharding.spec == P("model")
  assert sn.kernel_v[...].sharding.spec in (P(), P(None))
  with nnx.use_eager_sharding(False):
    reference = _nnx_model()
  state = lambda m: nnx.to_pure_dict(nnx.state(m))
  _assert_trees_close(state(model), state(reference))
  x = jax.device_put(X, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    y = nnx.jit(lambda m, x: m(x))(model, x)
  _assert_trees_close(y, reference(X))
  _assert_trees_close(state(model), state(reference))  # the training call's new state too
  assert sn.kernel_u[...].sharding.spec == P("model")


def test_nnx_explicit_mesh_state_is_sharded_as_its_names():
  """Under ``Explicit`` axes the arrays must match their names: ``u`` was created
  replicated beside its ``('model',)`` name, so NNX's ``with_sharding_constraint`` recipe
  raised (``kernel_g`` was already placed)."""
  from flax import nnx

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    model = _nnx_model()
    sn = model.layers[2]
    assert sn.kernel_u[...].sharding.spec == P("model")

    @nnx.jit
    def reshard(m):
      state = nnx.state(m)
      nnx.update(m, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))

    reshard(model)
    x = jax.device_put(X, NamedSharding(mesh, P("data")))
    y = nnx.jit(lambda m, x: m(x))(model, x)
  with nnx.use_eager_sharding(False):
    reference = _nnx_model()
  _assert_trees_close(y, reference(X))


def test_nnx_layer_made_under_a_mesh_wraps_outside_it():
  """Shards eagerly only where there is a mesh: outside one it raised Flax's 'An auto mesh
  context or metadata is required' (weight norm wrapped there)."""
  from flax import nnx

  import flaxnorm.nnx as fnx

  init = nnx.with_partitioning(LECUN, (None, "model"))
  with jax.set_mesh(_mesh((4, 2), ("data", "model"))):
    layers = [nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(i)) for i in range(2)]
  fnx.weight_norm(layers[0])
  sn = fnx.spectral_norm(layers[1])
  assert sn.kernel_u.get_metadata("out_sharding", None) == ("model",)


# --------------------------------------------------------------------------- #
# Operator mode under sharding
# --------------------------------------------------------------------------- #


def test_operator_mode_trains_on_an_explicit_mesh_and_in_shard_map():
  """Operator mode failed where the plain layer and kernel mode work: on an Explicit mesh
  its replicated ``u`` did not match ``A v`` sharded like the kernel (and its inner
  products contracted two sharded operands), and inside ``shard_map`` every training
  apply ran the layer's init, whose partitioning constraint names an axis not there."""
  dense = flaxnorm.spectral_norm(nn.Dense(16, kernel_init=_part((None, "model"))), operator=True)
  x = jax.random.normal(jax.random.key(1), (8, 8))
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  reference = _init(dense, x)
  variables = jax.device_put(reference, _shardings(mesh, jax.eval_shape(dense.init, KEY, x)))

  def loss_fn(params, variables, x):
    y, updates = dense.apply({**variables, "params": params}, x, mutable=["spectral"])
    return jnp.sum(y**2), updates

  step = jax.value_and_grad(loss_fn, has_aux=True)
  expected = jax.jit(step)(reference["params"], reference, x)
  with jax.set_mesh(mesh):
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    out = jax.jit(step)(variables["params"], variables, x_sharded)
  _assert_trees_close(out, expected, rtol=1e-5, atol=1e-4)
  outside = jax.jit(step)(variables["params"], variables, x_sharded)  # arrays carry the mesh
  _assert_trees_close(outside, expected, rtol=1e-5, atol=1e-4)

  conv = flaxnorm.spectral_norm(
    nn.Conv(4, (3,), kernel_init=_part((None, None, "model"))), operator=True
  )
  xs = jax.random.normal(jax.random.key(2), (16, 5, 3))
  variables = _init(conv, xs)

  def train(v, x):
    y, updates = conv.apply(v, x, mutable=["spectral"])
    return lax.pmean(jnp.sum(y**2), "data"), updates

  data = _mesh((8,), ("data",))
  sharded = jax.jit(jax.shard_map(train, mesh=data, in_specs=(P(), P("data")), out_specs=P()))
  loss, updates = sharded(variables, xs)
  y, expected = conv.apply(variables, xs, mutable=["spectral"])
  _assert_trees_close((loss, updates), (jnp.sum(y**2) / 8, expected), rtol=1e-5, atol=1e-4)


def test_nnx_operator_mode_wraps_and_trains_on_an_explicit_mesh():
  from flax import nnx

  import flaxnorm.nnx as fnx

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  init = nnx.with_partitioning(LECUN, (None, "model"))
  x = jax.random.normal(jax.random.key(1), (8, 8))
  with nnx.use_eager_sharding(False):
    reference = fnx.spectral_norm(
      nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0)), operator=True, input_shape=(8,)
    )
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  expected = nnx.grad(loss)(reference, x)
  with jax.set_mesh(mesh):
    layer = fnx.spectral_norm(
      nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0)), operator=True, input_shape=(8,)
    )
    grads = nnx.jit(nnx.grad(loss))(layer, jax.device_put(x, NamedSharding(mesh, P("data"))))
  _assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(expected), rtol=1e-5, atol=1e-4)


def test_tree_spectral_norm_of_a_kernel_sharded_on_a_merged_axis_on_an_explicit_mesh():
  """A conv kernel sharded on its input channels: its matrix view merges that axis, and the
  reshape raised 'This reshape is not supported' under Explicit axes (weight norm worked)."""
  import flaxnorm.tree as ft

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  kernel = jax.random.normal(KEY, (3, 3, 4, 8))
  params = {"conv": {"kernel": kernel}}
  reference = ft.spectral_norm_init(params, jax.random.key(1))
  expected = ft.spectral_norm_apply(params, reference, update=True, n_power_iterations=2)
  sharded = {
    "conv": {"kernel": jax.device_put(kernel, NamedSharding(mesh, P(None, None, "model")))}
  }
  apply = lambda p, s: ft.spectral_norm_apply(p, s, update=True, n_power_iterations=2)
  with jax.set_mesh(mesh):
    state = jax.jit(ft.spectral_norm_init)(sharded, jax.random.key(1))
    out = jax.jit(apply)(sharded, state)
  _assert_trees_close((state, out), (reference, expected))
  _assert_trees_close(jax.jit(apply)(sharded, state), expected)  # outside jax.set_mesh
  assert out[0]["conv"]["kernel"].sharding.spec == P(None, None, "model", None)
