"""Checkpoint round trips of params, spectral state and optimizer state.

Training resumed from a checkpoint must take bit-identical steps to an
uninterrupted run, through ``flax.serialization`` bytes and through orbax.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import errors as flax_errors
from flax import serialization

import flaxnorm

X = jax.random.normal(jax.random.key(1), (16, 6))
T = jax.random.normal(jax.random.key(2), (16, 2))
OPT = optax.adam(1e-2)
N_STEPS = 3


class WNNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(flaxnorm.weight_norm(nn.Dense(16))(x))
    h = flaxnorm.weight_norm(nn.Conv(2, (3,)))(x[..., None])
    x = nn.relu(h.reshape(x.shape[0], -1))
    return flaxnorm.weight_norm(nn.Dense(2), axis=None)(x)


class SNNet(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(flaxnorm.spectral_norm(nn.Dense(self.width))(x))
    x = nn.relu(flaxnorm.spectral_norm(nn.Dense(self.width), n_power_iterations=2)(x))
    return flaxnorm.spectral_norm(nn.Dense(2))(x)


MODELS = {"weight_norm": WNNet(), "spectral_norm": SNNet()}


def _init_state(model, seed):
  variables = jax.jit(model.init)(jax.random.key(seed), X)
  return {"variables": variables, "opt_state": OPT.init(variables["params"])}


def _make_step(model):
  @jax.jit
  def step(state):
    variables = state["variables"]

    def loss_fn(params):
      y, updates = model.apply({**variables, "params": params}, X, mutable=["spectral"])
      return jnp.mean((y - T) ** 2), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    deltas, opt_state = OPT.update(grads, state["opt_state"], variables["params"])
    params = optax.apply_updates(variables["params"], deltas)
    return {"variables": {**variables, **updates, "params": params}, "opt_state": opt_state}, loss

  return step


def _run(step, state):
  losses = []
  for _ in range(N_STEPS):
    state, loss = step(state)
    losses.append(loss)
  return state, losses


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module", params=sorted(MODELS))
def uninterrupted(request):
  """A run checkpointed after ``N_STEPS`` steps, and its next ``N_STEPS`` steps."""
  model = MODELS[request.param]
  step = _make_step(model)
  saved, _ = _run(step, _init_state(model, seed=0))
  final, losses = _run(step, saved)
  if request.param == "spectral_norm":
    # The state moved since init: restoring a stale one would show.
    assert "spectral" in saved["variables"]
  return model, step, saved, final, losses


def _bytes_round_trip(state, template, path):
  path = path / "state.msgpack"
  path.write_bytes(serialization.to_bytes(state))
  return serialization.from_bytes(template, path.read_bytes())


def _orbax_round_trip(state, template, path):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "ckpt", state)
    ckptr.wait_until_finished()
    return ckptr.restore(path / "ckpt", template)


@pytest.mark.parametrize(
  "round_trip", [_bytes_round_trip, _orbax_round_trip], ids=["bytes", "orbax"]
)
def test_resume_from_checkpoint_is_bit_identical(uninterrupted, round_trip, tmp_path):
  model, step, saved, final, losses = uninterrupted
  # A differently seeded state as the target: every leaf must come from the file.
  template = _init_state(model, seed=7)
  restored = round_trip(saved, template, tmp_path)
  _assert_trees_equal(restored, saved)

  resumed, resumed_losses = _run(step, restored)
  _assert_trees_equal(resumed_losses, losses)
  _assert_trees_equal(resumed, final)


def test_spectral_state_moves_between_checkpoints(uninterrupted):
  """The resumed steps above compare a state that actually changes."""
  _, _, saved, final, _ = uninterrupted
  before, after = saved["variables"], final["variables"]
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    if np.ndim(a) > 0
  )
  if "spectral" in before:
    u0, u1 = before["spectral"]["Dense_0"], after["spectral"]["Dense_0"]
    assert not np.array_equal(u0["kernel_u"], u1["kernel_u"])


# --------------------------------------------------------------------------- #
# Partition metadata through a checkpoint
# --------------------------------------------------------------------------- #


def test_partitioned_variables_round_trip(tmp_path):
  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = flaxnorm.weight_norm(nn.Dense(8, kernel_init=init))(x)
      return flaxnorm.spectral_norm(nn.Dense(4, kernel_init=init))(x)

  boxed = jax.jit(Net().init)(jax.random.key(0), X)
  template = jax.jit(Net().init)(jax.random.key(3), X)
  for round_trip, sub in ((_bytes_round_trip, "bytes"), (_orbax_round_trip, "orbax")):
    (tmp_path / sub).mkdir()
    restored = round_trip(boxed, template, tmp_path / sub)
    assert nn.get_partition_spec(restored) == nn.get_partition_spec(boxed)
    _assert_trees_equal(nn.meta.unbox(restored), nn.meta.unbox(boxed))


# --------------------------------------------------------------------------- #
# A checkpoint from a differently sized layer
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("raw_restore", ["bytes", "orbax"])
def test_checkpoint_from_resized_layer_is_a_clear_error(raw_restore, tmp_path):
  old, new = SNNet(width=16), SNNet(width=12)
  saved = jax.jit(old.init)(jax.random.key(0), X)
  if raw_restore == "bytes":
    (tmp_path / "v.msgpack").write_bytes(serialization.to_bytes(saved))
    restored = serialization.msgpack_restore((tmp_path / "v.msgpack").read_bytes())
  else:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp_path / "ckpt", saved)
      ckptr.wait_until_finished()
      restored = ckptr.restore(tmp_path / "ckpt")
  fresh = jax.jit(new.init)(jax.random.key(0), X)

  # Fresh params for the resized layers, spectral state from the checkpoint.
  variables = {"params": fresh["params"], "spectral": restored["spectral"]}
  match = (
    r"stored state of param 'kernel' of layer 'Dense_0' \(Dense\) does not fit "
    r"the param of shape \(6, 12\): expected kernel_u of shape \(12,\).*got \(16,\).*"
    r"differently sized layer"
  )
  for mutable in (["spectral"], False):
    with pytest.raises(ValueError, match=match):
      new.apply(variables, X, mutable=mutable)
  # The whole checkpoint: Flax's own param shape check speaks first.
  with pytest.raises(flax_errors.ScopeParamShapeError, match=r"\(6, 12\).*\(6, 16\)"):
    new.apply(restored, X)
