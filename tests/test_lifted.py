"""Weight and spectral norm inside lifted transforms: RNNs and scans over time, stacked layers, ensembles.

Every case is held to the matching unrolled Python loop: outputs, gradients and
the state after one training apply. Over time the spectral state advances once
per apply and every step uses the same normalized kernel (PyTorch's ``nn.LSTM``
with a spectrally normed weight): the reference is one training call of the
cell, then the time loop in evaluation with that new state.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import flaxnorm

KEY = jax.random.key(0)
B, T, F, H = 2, 3, 3, 4  # batch, time, input features, hidden features
XS = jax.random.normal(jax.random.key(1), (B, T, F))
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _member(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


# --------------------------------------------------------------------------- #
# Linen: nn.RNN over time.
# --------------------------------------------------------------------------- #


def _linen_cell(transform, cell=nn.SimpleCell):
  return transform(cell(H), recursive=True)


def _perturbed(params):
  """Params far from those the spectral state converged to: each power-iteration step shows."""
  return jax.tree.map(lambda a: a + 0.5 * jnp.cos(3.0 * a), params)


def _linen_unrolled(cell, params, state, train):
  """The time loop in Python: one training call first (if ``train``), then evaluation."""
  carry = nn.SimpleCell(H).initialize_carry(jax.random.key(0), (B, F))
  variables = {"params": params, **state}
  if train and state:
    _, new = cell.apply(variables, carry, XS[:, 0], mutable=["spectral"])
    variables = {"params": params, **new}
  ys = []
  for t in range(T):
    carry, y = cell.apply(variables, carry, XS[:, t])
    ys.append(y)
  return jnp.stack(ys, axis=1), {k: v for k, v in variables.items() if k != "params"}


RNNS = {
  "rnn_of_wrapped_cell": lambda tr: nn.RNN(_linen_cell(tr)),
  "wrapped_rnn": lambda tr: tr(nn.RNN(nn.SimpleCell(H)), recursive=True),
}


@pytest.mark.parametrize("transform", [flaxnorm.spectral_norm, flaxnorm.weight_norm])
@pytest.mark.parametrize("build", RNNS.values(), ids=RNNS.keys())
def test_linen_rnn_matches_unrolled_loop(build, transform):
  rnn, cell = build(transform), _linen_cell(transform)
  variables = rnn.init(KEY, XS)
  params = _perturbed(variables["params"]["cell"])
  state = {k: v["cell"] for k, v in variables.items() if k != "params"}
  if transform is flaxnorm.spectral_norm:
    assert set(state["spectral"]) == {"h", "i"}

  def train_loss(p):
    y, new = rnn.apply({**variables, "params": {"cell": p}}, XS, mutable=["spectral"])
    return jnp.sum(jnp.sin(y)), (y, new)

  def ref_loss(p):
    y, new = _linen_unrolled(cell, p, state, train=True)
    return jnp.sum(jnp.sin(y)), (y, new)

  (_, (y, new)), grads = jax.value_and_grad(train_loss, has_aux=True)(params)
  (_, (y_ref, new_ref)), grads_ref = jax.value_and_grad(ref_loss, has_aux=True)(params)
  chex.assert_trees_all_close(y, y_ref, **TOL)
  chex.assert_trees_all_close(grads, grads_ref, **TOL)
  chex.assert_trees_all_close({k: v["cell"] for k, v in new.items()}, new_ref, **TOL)

  # Evaluation with the new state: the same loop, and nothing changes.
  trained = {**variables, **new, "params": {"cell": params}}
  y_eval, unchanged = rnn.apply(trained, XS, mutable=["params"])  # spectral immutable: eval
  y_eval_ref, _ = _linen_unrolled(cell, params, {k: v["cell"] for k, v in new.items()}, False)
  chex.assert_trees_all_close(y_eval, y_eval_ref, **TOL)
  chex.assert_trees_all_equal(unchanged["params"], trained["params"])


def test_linen_rnn_state_advances_once_per_apply():
  # The issue's own example: an LSTM; two applies in a row, eagerly (the same
  # arrays passed back in), each one power-iteration step.
  rnn = nn.RNN(_linen_cell(flaxnorm.spectral_norm, nn.LSTMCell))
  variables = rnn.init(KEY, XS)
  params = _perturbed(variables["params"])
  state = variables["spectral"]
  dense = flaxnorm.spectral_norm(nn.Dense(H, use_bias=False))
  ii = state["cell"]["ii"]
  for _ in range(2):
    _, state = rnn.apply({"params": params, "spectral": state}, XS, mutable=["spectral"])
    state = state["spectral"]
    _, step = dense.apply(
      {"params": params["cell"]["ii"], "spectral": ii}, XS[:, 0], mutable=["spectral"]
    )
    ii = step["spectral"]
    chex.assert_trees_all_close(state["cell"]["ii"], ii, **TOL)


def test_linen_rnn_under_jit():
  rnn = nn.RNN(_linen_cell(flaxnorm.spectral_norm))
  variables = rnn.init(KEY, XS)
  eager = rnn.apply(variables, XS, mutable=["spectral"])
  jitted = jax.jit(lambda v: rnn.apply(v, XS, mutable=["spectral"]))(variables)
  chex.assert_trees_all_close(eager, jitted, **TOL)


def test_linen_scan_without_the_collection_says_how():
  cell = nn.scan(
    _linen_cell(flaxnorm.spectral_norm).__class__,
    variable_broadcast="params",
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
  )
  carry = nn.SimpleCell(H).initialize_carry(jax.random.key(0), (B, F))
  with pytest.raises(ValueError, match=r"nn\.scan.*variable_broadcast=\['params', 'spectral'\]"):
    cell(H).init(KEY, carry, XS)


# --------------------------------------------------------------------------- #
# Linen: nn.scan over stacked layers, nn.vmap ensembles.
# --------------------------------------------------------------------------- #

L = 3  # stacked layers / ensemble members
LIFT = {
  "variable_axes": {"params": 0, "spectral": 0},
  "split_rngs": {"params": True, "spectral": True},
}


class _Block(nn.Module):
  transform: object

  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(self.transform(nn.Dense(F))(h)), None


def _layer_tree(variables, i):
  return {k: _member(v["Dense_0"], i) for k, v in variables.items()}


def _check_against_members(apply_all, apply_one, variables, n):
  """Outputs, gradients and the trained state of the stack vs. each member alone."""
  mutable = ["spectral"] if "spectral" in variables else []

  def loss(params):
    y, new = apply_all({**variables, "params": params}, mutable)
    return jnp.sum(jnp.sin(y)), (y, new)

  def ref_loss(params):
    y, new = apply_one({**variables, "params": params}, mutable)
    return jnp.sum(jnp.sin(y)), (y, new)

  (_, (y, new)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  (_, (y_ref, new_ref)), grads_ref = jax.value_and_grad(ref_loss, has_aux=True)(variables["params"])
  chex.assert_trees_all_close(y, y_ref, **TOL)
  chex.assert_trees_all_close(grads, grads_ref, **TOL)
  chex.assert_trees_all_close(new, new_ref, **TOL)
  del n


@pytest.mark.parametrize("transform", [flaxnorm.spectral_norm, flaxnorm.weight_norm])
def test_linen_scan_over_stacked_layers(transform):
  stack = nn.scan(_Block, length=L, **LIFT)(transform)
  h0 = XS[:, 0]
  variables = stack.init(KEY, h0, None)
  assert variables["params"]["Dense_0"][next(iter(variables["params"]["Dense_0"]))].shape[0] == L
  layer = transform(nn.Dense(F))

  def apply_all(v, mutable):
    (h, _), new = stack.apply(v, h0, None, mutable=mutable)
    return h, new

  def apply_one(v, mutable):
    h, news = h0, []
    for i in range(L):
      y, new = layer.apply(_layer_tree(v, i), h, mutable=mutable)
      h = jnp.tanh(y)
      news.append(new)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *news) if mutable else {}
    return h, {k: {"Dense_0": x} for k, x in stacked.items()}

  _check_against_members(apply_all, apply_one, variables, L)


@pytest.mark.parametrize("transform", [flaxnorm.spectral_norm, flaxnorm.weight_norm])
def test_linen_vmap_ensemble(transform):
  ensemble = nn.vmap(transform(nn.Dense), in_axes=None, out_axes=0, axis_size=L, **LIFT)(F)
  x = XS[:, 0]
  variables = ensemble.init(KEY, x)
  member = transform(nn.Dense(F))

  def apply_all(v, mutable):
    return ensemble.apply(v, x, mutable=mutable)

  def apply_one(v, mutable):
    outs = [member.apply(_member(v, i), x, mutable=mutable) for i in range(L)]
    ys = jnp.stack([y for y, _ in outs])
    return ys, jax.tree.map(lambda *a: jnp.stack(a), *[n for _, n in outs])

  _check_against_members(apply_all, apply_one, variables, L)
  if transform is flaxnorm.spectral_norm:  # each member its own state
    sigmas = variables["spectral"]["kernel_sigma"]
    assert sigmas.shape == (L,) and len(set(sigmas.tolist())) == L
