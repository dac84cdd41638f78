"""Weight and spectral norm inside lifted transforms: RNNs and scans over time, stacked layers, ensembles.

Every case is held to the matching unrolled Python loop: outputs, gradients and
the state after one training apply. Over time the spectral state advances once
per apply and every step uses the same normalized kernel (PyTorch's ``nn.LSTM``
with a spectrally normed weight): the reference is one training call of the
cell, then the time loop in evaluation with that new state.
"""

import functools
import pickle

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx

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


# Weight norm has no state: wrapping the cell is enough to show it keeps working.
RNN_CASES = {
  "rnn_of_wrapped_cell-spectral": ("rnn_of_wrapped_cell", flaxnorm.spectral_norm),
  "wrapped_rnn-spectral": ("wrapped_rnn", flaxnorm.spectral_norm),
  "rnn_of_wrapped_cell-weight": ("rnn_of_wrapped_cell", flaxnorm.weight_norm),
}


@pytest.mark.parametrize(("build", "transform"), RNN_CASES.values(), ids=RNN_CASES.keys())
def test_linen_rnn_matches_unrolled_loop(build, transform):
  rnn, cell = RNNS[build](transform), _linen_cell(transform)
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
  # Two applies in a row, eagerly (the same arrays passed back in): each one
  # power-iteration step, as for the input layer on its own.
  rnn = nn.RNN(_linen_cell(flaxnorm.spectral_norm))
  variables = rnn.init(KEY, XS)
  params = _perturbed(variables["params"])
  state = variables["spectral"]
  dense = flaxnorm.spectral_norm(nn.Dense(H))
  layer_state = state["cell"]["i"]
  for _ in range(2):
    _, state = rnn.apply({"params": params, "spectral": state}, XS, mutable=["spectral"])
    state = state["spectral"]
    _, step = dense.apply(
      {"params": params["cell"]["i"], "spectral": layer_state}, XS[:, 0], mutable=["spectral"]
    )
    layer_state = step["spectral"]
    chex.assert_trees_all_close(state["cell"]["i"], layer_state, **TOL)


def test_linen_rnn_under_jit():
  # The issue's own example, an LSTM, under jax.jit: the same as eagerly.
  rnn = nn.RNN(_linen_cell(flaxnorm.spectral_norm, nn.LSTMCell))
  variables = jax.jit(rnn.init)(KEY, XS)
  assert len(variables["spectral"]["cell"]) == 8  # ii, if, ig, io, hi, hf, hg, ho
  train = jax.jit(lambda v: rnn.apply(v, XS, mutable=["spectral"]))
  eager = rnn.apply(variables, XS, mutable=["spectral"])
  chex.assert_trees_all_close(eager, train(variables), **TOL)


class _TiedCell(nn.Module):
  """A cell calling one spectrally normed layer twice per time step."""

  @nn.compact
  def __call__(self, c, x):
    layer = flaxnorm.spectral_norm(nn.Dense(F, use_bias=False), n_init_iterations=0)
    c = layer(jnp.tanh(layer(x) + c))
    return c, c


@pytest.mark.parametrize("jit", [False, True])
def test_linen_scan_with_a_layer_called_twice_per_step(jit):
  # Over time the state advances as in one call of the cell (two iterations
  # here), and every step of the loop uses that new state: evaluation with it
  # gives the training output. Until 2026-12-05 the loop used a state one
  # iteration ahead of the one it stored (eval 0.18 off).
  scan = nn.scan(
    _TiedCell,
    variable_broadcast=["params", "spectral"],
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
  )()
  c0 = jnp.zeros((B, F))
  maybe_jit = jax.jit if jit else (lambda f: f)
  variables = maybe_jit(scan.init)(KEY, c0, XS)
  (_, ys), new = maybe_jit(lambda v: scan.apply(v, c0, XS, mutable=["spectral"]))(variables)
  _, one_step = _TiedCell().apply(variables, c0, XS[:, 0], mutable=["spectral"])
  chex.assert_trees_all_close(new, one_step, **TOL)
  _, ys_eval = scan.apply({**variables, **new}, c0, XS)
  chex.assert_trees_all_close(ys, ys_eval, **TOL)
  assert not np.allclose(
    new["spectral"]["Dense_0"]["kernel_sigma"], variables["spectral"]["Dense_0"]["kernel_sigma"]
  )


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
  ensemble = nn.vmap(
    flaxnorm.spectral_norm(nn.Dense),
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=None,
    axis_size=2,
  )
  with pytest.raises(
    ValueError, match=r"\(Dense\).*nn\.vmap.*variable_axes=\{'params': 0, 'spectral': 0\}"
  ):
    ensemble(F).init(KEY, XS[:, 0])


def test_linen_lifted_layer_without_its_state_names_both_causes():
  """Evaluation with params only, in a lift that does carry the state: the message says the
  variables may lack the collection (it only blamed the lift); nested lifts are all named."""
  rnn = nn.RNN(flaxnorm.spectral_norm(nn.SimpleCell(H), recursive=True))
  variables = rnn.init(KEY, XS)
  with pytest.raises(
    ValueError, match=r"inside a Flax nn\.scan and finds no 'spectral' state.*lack the 'spectral'"
  ):
    rnn.apply({"params": variables["params"]}, XS)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return flaxnorm.spectral_norm(nn.Dense(F))(h), None

  stack = nn.scan(
    nn.remat(Block), length=2, variable_axes={"params": 0}, split_rngs={"params": True}
  )
  with pytest.raises(ValueError, match=r"nn\.remat and nn\.scan and finds no 'spectral' state"):
    stack().init(KEY, XS[:, 0], None)


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
  calls: int = 1  # the same layer called this many times

  @nn.compact
  def __call__(self, h, _):
    layer = self.transform(nn.Dense(F))
    for _ in range(self.calls):
      h = jnp.tanh(layer(h))
    return h, None


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


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("transform", [flaxnorm.spectral_norm, flaxnorm.weight_norm])
def test_linen_scan_over_stacked_layers(transform, calls):
  # calls=2: each layer called twice iterates twice, as alone (until 2026-12-05
  # the second call took the first's state as the scan's and did not iterate).
  if calls == 2 and transform is flaxnorm.spectral_norm:  # a state that moves at each call
    transform = functools.partial(transform, n_init_iterations=0)
  stack = nn.scan(_Block, length=L, **LIFT)(transform, calls)
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
      new = _layer_tree(v, i)
      for _ in range(calls):
        y, upd = layer.apply(new, h, mutable=mutable)
        new, h = {**new, **upd}, jnp.tanh(y)
      news.append({k: new[k] for k in upd})
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


@pytest.mark.parametrize("transform", [flaxnorm.remove_spectral_norm, flaxnorm.remove_weight_norm])
def test_linen_removal_of_stacked_layers(transform):
  """Each member folds on its own (until 2026-12-05 sigma's (L,) vector scaled the
  last kernel axis as a whole)."""
  wrap = (
    flaxnorm.spectral_norm if transform is flaxnorm.remove_spectral_norm else flaxnorm.weight_norm
  )
  lifted = lambda layer: nn.vmap(layer, in_axes=None, out_axes=0, axis_size=L, **LIFT)
  x = XS[:, 0]
  variables = lifted(wrap(nn.Dense))(L).init(KEY, x)  # features == members: shapes fit both ways
  plain = lifted(nn.Dense)(L)
  chex.assert_trees_all_close(
    plain.apply(transform(variables), x), lifted(wrap(nn.Dense))(L).apply(variables, x), **TOL
  )
  bad = {**variables, "spectral": {**variables.get("spectral", {}), "kernel_sigma": jnp.ones(2)}}
  if transform is flaxnorm.remove_spectral_norm:
    with pytest.raises(ValueError, match=r"stacked state \(sigma of shape \(2,\)\)"):
      transform(bad)


# --------------------------------------------------------------------------- #
# NNX: ensembles stacked by nnx.vmap, and layer stacks under nnx.scan.
# --------------------------------------------------------------------------- #

NNX_TRANSFORMS = [flaxnorm.nnx.spectral_norm, flaxnorm.nnx.weight_norm]


def _nnx_stack():
  @nnx.split_rngs(splits=L)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return nnx.Linear(F, F, rngs=rngs)

  return make(nnx.Rngs(0))


def _nnx_members(stacked, transform):
  """Each member of the wrapped stack as its own wrapped layer, with the same variables."""
  members = []
  for i in range(L):
    layer = transform(nnx.Linear(F, F, rngs=nnx.Rngs(0)))
    nnx.update(layer, _member(nnx.state(stacked), i))
    members.append(layer)
  return members


def _pure(tree):
  return nnx.to_pure_dict(tree)


@pytest.mark.parametrize("transform", NNX_TRANSFORMS)
def test_nnx_vmap_ensemble_matches_members(transform):
  ensemble = transform(_nnx_stack(), ensemble_axis=0)
  members = _nnx_members(ensemble, transform)
  if transform is flaxnorm.nnx.spectral_norm:  # each member its own sigma, at wrap time
    sigmas = [np.linalg.norm(np.asarray(vars(m)["kernel"][...]), 2) for m in members]
    chex.assert_trees_all_close(ensemble.kernel_sigma[...], jnp.array(sigmas), rtol=1e-4)
  else:
    for i, m in enumerate(members):
      g = jnp.linalg.norm(m.kernel_v[...], axis=0, keepdims=True)
      chex.assert_trees_all_close(ensemble.kernel_g[i], g, **TOL)
  x = XS[:, 0]

  def loss(layer):
    return jnp.sum(jnp.sin(layer(x)))

  @nnx.vmap(in_axes=(0,), out_axes=0)
  def step(layer):
    return nnx.grad(loss)(layer)

  grads = step(ensemble)  # a training step: each member's state advances
  for i, m in enumerate(members):
    chex.assert_trees_all_close(_member(_pure(grads), i), _pure(nnx.grad(loss)(m)), **TOL)
    chex.assert_trees_all_close(_member(_pure(nnx.state(ensemble)), i), _pure(nnx.state(m)), **TOL)
  # Outside nnx.vmap, the stacked kernel is every member's normalized kernel.
  chex.assert_trees_all_close(ensemble.kernel, jnp.stack([m.kernel for m in members]), **TOL)


INSIDE_CONSTRUCTOR = {
  "weight": (flaxnorm.nnx.weight_norm, {}),
  "spectral": (flaxnorm.nnx.spectral_norm, {}),
  "operator": (flaxnorm.nnx.spectral_norm, {"operator": True, "input_shape": (F,)}),
}


@pytest.mark.parametrize(
  ("transform", "kwargs"), INSIDE_CONSTRUCTOR.values(), ids=INSIDE_CONSTRUCTOR
)
def test_nnx_ensemble_wrapped_inside_the_constructor(transform, kwargs):
  # Each member wrapped inside nnx.vmap: outside it the stack reads and
  # removes as an ensemble_axis=0 one. Until 2026-12-06 both raised an error
  # blaming a checkpoint.
  @nnx.split_rngs(splits=L)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return transform(nnx.Linear(F, F, rngs=rngs), **kwargs)

  ensemble = make(nnx.Rngs(0))
  ensemble.eval()
  x = XS[:, 0]
  y = nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None))(ensemble, x)
  members = [transform(nnx.Linear(F, F, rngs=nnx.Rngs(0)), **kwargs) for _ in range(L)]
  for i, m in enumerate(members):
    nnx.update(m, _member(nnx.state(ensemble), i))
    m.eval()
    chex.assert_trees_all_close(ensemble.kernel[i], m.kernel, **TOL)
    chex.assert_trees_all_close(y[i], m(x), **TOL)
  with pytest.raises(ValueError, match=r"ensemble \(stacked by nnx\.vmap\) called outside"):
    ensemble(x)
  remove = {"weight_norm": flaxnorm.nnx.remove_weight_norm}.get(
    transform.__name__, flaxnorm.nnx.remove_spectral_norm
  )
  remove(ensemble)
  assert type(ensemble) is nnx.Linear
  chex.assert_trees_all_close(nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None))(ensemble, x), y, **TOL)  # fmt: skip


@pytest.mark.parametrize("transform", NNX_TRANSFORMS)
def test_nnx_scan_over_stacked_layers(transform):
  stack = transform(_nnx_stack(), ensemble_axis=0)
  members = _nnx_members(stack, transform)
  h0 = XS[:, 0]

  def run(model):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, h):
      return jnp.tanh(layer(h))

    return jnp.sum(jnp.sin(body(model, h0)))

  def run_members(ms):
    h = h0
    for m in ms:
      h = jnp.tanh(m(h))
    return jnp.sum(jnp.sin(h))

  loss, grads = nnx.value_and_grad(run)(stack)
  loss_ref, grads_ref = nnx.value_and_grad(run_members)(nnx.List(members))
  chex.assert_trees_all_close(loss, loss_ref, **TOL)
  for i in range(L):
    chex.assert_trees_all_close(_member(_pure(grads), i), _pure(grads_ref)[i], **TOL)
    chex.assert_trees_all_close(
      _member(_pure(nnx.state(stack)), i), _pure(nnx.state(members[i])), **TOL
    )


@pytest.mark.parametrize("transform", NNX_TRANSFORMS)
def test_nnx_stacked_module_without_ensemble_axis_says_how(transform):
  with pytest.raises(ValueError, match=r"one axis more.*ensemble_axis=0.*nnx\.vmap\(lambda key"):
    transform(_nnx_stack())
  with pytest.raises(ValueError, match=r"ensemble_axis=0 needs .* stacked"):
    transform(nnx.Linear(F, F, rngs=nnx.Rngs(0)), ensemble_axis=0)
  with pytest.raises(ValueError, match="ensemble_axis must be None or 0"):
    transform(_nnx_stack(), ensemble_axis=1)
  with pytest.raises(TypeError, match="ensemble_axis must be None or 0"):
    transform(_nnx_stack(), ensemble_axis="0")


@pytest.mark.parametrize("transform", NNX_TRANSFORMS)
def test_nnx_ensemble_called_outside_vmap_says_how(transform):
  """Weight norm too: it used to run the stacked kernel on the batch, silently."""
  ensemble = transform(_nnx_stack(), ensemble_axis=0)
  with pytest.raises(ValueError, match=r"outside nnx\.vmap.*nnx\.vmap\(lambda layer"):
    ensemble(XS[:, 0])
  ensemble.eval()
  with pytest.raises(ValueError, match=r"outside nnx\.vmap"):
    ensemble(XS[:, 0])


@pytest.mark.parametrize("transform", NNX_TRANSFORMS)
def test_nnx_ensemble_axis_checks_general_layers(transform):
  """LinearGeneral and Einsum know their rank: unstacked with ensemble_axis, or stacked
  without, is refused (it was accepted, one norm per element or for the whole stack)."""
  with pytest.raises(ValueError, match=r"needs param 'kernel' of LinearGeneral stacked, with 4"):
    transform(nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0)), ensemble_axis=0)
  with pytest.raises(ValueError, match=r"needs param 'kernel' of Einsum stacked, with 3"):
    transform(nnx.Einsum("ab,bc->ac", (3, 4), rngs=nnx.Rngs(0)), ensemble_axis=0)

  @nnx.split_rngs(splits=L)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return nnx.LinearGeneral(F, (2, 3), rngs=rngs)

  with pytest.raises(ValueError, match=r"one axis more than a LinearGeneral kernel \(3 dims\)"):
    transform(make(nnx.Rngs(0)))
  ensemble = transform(make(nnx.Rngs(0)), ensemble_axis=0)
  y = nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None))(ensemble, XS[:, 0])
  assert y.shape == (L, B, 2, 3)


# --------------------------------------------------------------------------- #
# NNX: nnx.RNN over time.
# --------------------------------------------------------------------------- #


def _nnx_rnn(transform):
  rnn = nnx.RNN(nnx.SimpleCell(F, H, rngs=nnx.Rngs(0)))
  flaxnorm.nnx.wrap_modules(rnn, transform, where=nnx.Linear)
  for _, m in nnx.iter_modules(rnn.cell):  # params far from the converged state
    for p in ("kernel", "kernel_v"):
      if isinstance(vars(m).get(p), nnx.Param):
        vars(m)[p][...] = _perturbed(vars(m)[p][...])
  return rnn


def _nnx_unrolled(cell):
  carry, ys = jnp.zeros((B, H)), []
  for t in range(T):
    carry, y = cell(carry, XS[:, t])
    ys.append(y)
  return jnp.stack(ys, axis=1)


@pytest.mark.parametrize("transform", NNX_TRANSFORMS)
def test_nnx_rnn_matches_unrolled_loop(transform):
  rnn = _nnx_rnn(transform)
  ref = nnx.clone(rnn.cell)
  if transform is flaxnorm.nnx.spectral_norm:
    ref(jnp.zeros((B, H)), XS[:, 0])  # the one training step, then evaluation
    ref.eval()

  def loss(model):
    y = model(XS) if isinstance(model, nnx.RNN) else _nnx_unrolled(model)
    return jnp.sum(jnp.sin(y)), y

  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(rnn)
  (_, y_ref), grads_ref = nnx.value_and_grad(loss, has_aux=True)(ref)
  chex.assert_trees_all_close(y, y_ref, **TOL)
  chex.assert_trees_all_close(_pure(grads)["cell"], _pure(grads_ref), **TOL)
  chex.assert_trees_all_close(_pure(nnx.state(rnn.cell)), _pure(nnx.state(ref)), **TOL)

  rnn.eval()  # evaluation: the same loop, and nothing changes
  before = _pure(nnx.state(rnn.cell))
  chex.assert_trees_all_close(rnn(XS), _nnx_unrolled(ref), **TOL)
  chex.assert_trees_all_equal(_pure(nnx.state(rnn.cell)), before)


def test_nnx_rnn_gets_its_class_back_on_removal():
  rnn = _nnx_rnn(flaxnorm.nnx.spectral_norm)
  assert type(rnn) is not nnx.RNN
  rnn.eval()
  y = rnn(XS)
  flaxnorm.nnx.remove_spectral_norm(rnn)
  assert type(rnn) is nnx.RNN
  chex.assert_trees_all_close(rnn(XS), y, **TOL)


# --------------------------------------------------------------------------- #
# Operator mode over time: sigma = <u, A_W v> of the new state, differentiable in W.
# --------------------------------------------------------------------------- #

XH = jax.random.normal(jax.random.key(2), (B, T, H))  # a cell whose layers all take H inputs


def _operator_reference(cell, kernels, states):
  """Outputs of ``cell`` unrolled with kernels ``W / <u, v @ W>`` (a Dense's operator sigma)."""
  for name, w in kernels.items():
    u, v = states[name]
    sigma = jnp.vdot(u, v @ w)
    vars(getattr(cell, name))["kernel"][...] = w / sigma
  carry, ys = jnp.zeros((B, H)), []
  for t in range(T):
    carry, y = cell(carry, XH[:, t])
    ys.append(y)
  return jnp.stack(ys, axis=1)


def test_nnx_rnn_operator_mode_trains_through_sigma():
  # Until 2026-12-06 the time loop used the stored sigma, as evaluation does:
  # no gradient through sigma (kernel mode was right).
  plain = nnx.SimpleCell(H, H, rngs=nnx.Rngs(0))
  rnn = nnx.RNN(nnx.clone(plain))
  flaxnorm.nnx.wrap_modules(
    rnn, flaxnorm.nnx.spectral_norm, where=nnx.Linear, operator=True, input_shape=(H,)
  )
  names = ("dense_i", "dense_h")
  for name in names:  # params far from the converged state
    kernel = vars(getattr(rnn.cell, name))["kernel"]
    kernel[...] = _perturbed(kernel[...])
  one_call = nnx.clone(rnn.cell)
  one_call(jnp.zeros((B, H)), XH[:, 0])  # the one training step

  def loss(model):
    y = model(XH)
    return jnp.sum(jnp.sin(y)), y

  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(rnn)
  chex.assert_trees_all_close(_pure(nnx.state(rnn.cell)), _pure(nnx.state(one_call)), **TOL)
  layers = {n: getattr(rnn.cell, n) for n in names}
  states = {n: (m.kernel_u[...], m.kernel_v[...]) for n, m in layers.items()}
  kernels = {n: vars(m)["kernel"][...] for n, m in layers.items()}

  def ref_loss(ks):
    y = _operator_reference(nnx.clone(plain), ks, states)
    return jnp.sum(jnp.sin(y)), y

  (_, y_ref), grads_ref = jax.value_and_grad(ref_loss, has_aux=True)(kernels)
  chex.assert_trees_all_close(y, y_ref, **TOL)
  chex.assert_trees_all_close({n: grads["cell"][n]["kernel"][...] for n in names}, grads_ref, **TOL)


def test_linen_rnn_operator_mode_trains_through_sigma():
  rnn = nn.RNN(flaxnorm.spectral_norm(nn.SimpleCell(H), recursive=True, operator=True))
  variables = rnn.init(KEY, XH)
  params = _perturbed(variables["params"])

  def loss(p):
    y, new = rnn.apply({**variables, "params": p}, XH, mutable=["spectral"])
    return jnp.sum(jnp.sin(y)), (y, new)

  (_, (y, new)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  spectral = new["spectral"]["cell"]
  states = {n: (spectral[n]["kernel_u"], spectral[n]["kernel_v"]) for n in ("i", "h")}
  plain_params = params["cell"]

  def ref_loss(ks):
    p = {n: {**plain_params[n], "kernel": ks[n] / jnp.vdot(u, v @ ks[n])} for n, (u, v) in states.items()}  # fmt: skip
    ys, carry = [], jnp.zeros((B, H))
    for t in range(T):
      carry, y = nn.SimpleCell(H).apply({"params": p}, carry, XH[:, t])
      ys.append(y)
    y = jnp.stack(ys, axis=1)
    return jnp.sum(jnp.sin(y)), y

  kernels = {n: plain_params[n]["kernel"] for n in ("i", "h")}
  (_, y_ref), grads_ref = jax.value_and_grad(ref_loss, has_aux=True)(kernels)
  chex.assert_trees_all_close(y, y_ref, **TOL)
  chex.assert_trees_all_close({n: grads["cell"][n]["kernel"] for n in kernels}, grads_ref, **TOL)


def test_nnx_weight_normed_stack_of_any_layer_refuses_a_call_outside_vmap():
  # Weight norm alone on a layer that is not a plain linear one (Embed here)
  # had no call hook: outside nnx.vmap the token ids indexed the ensemble axis
  # (NaN fill), silently, until 2026-12-06.
  @nnx.split_rngs(splits=2)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return nnx.Embed(5, 3, rngs=rngs)

  stack = flaxnorm.nnx.weight_norm(make(nnx.Rngs(0)), name="embedding", ensemble_axis=0)
  with pytest.raises(ValueError, match=r"'embedding' of Embed is an ensemble .* outside nnx\.vmap"):
    stack(jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match=r"'embedding' of Embed is an ensemble .* outside nnx\.vmap"):
    stack.attend(jnp.ones((2, 3)))  # JAX's dot_general error until 2026-12-06
  y = nnx.vmap(lambda m, ids: m(ids), in_axes=(0, None))(stack, jnp.array([0, 1, 2]))
  assert y.shape == (2, 3, 3) and bool(jnp.all(jnp.isfinite(y)))


class _MyRNN(nnx.RNN):
  """A user's nnx.RNN subclass (module level: it pickles by name)."""


def _sigma_after_one_call(rnn, xs):
  rnn(xs)
  return rnn.cell.dense_h.kernel_sigma[...]


def test_nnx_rnn_subclass_iterates_once_per_call_and_pickles():
  # Only nnx.RNN itself was adopted until 2026-12-06: a subclass iterated at
  # every time step.
  xs = jax.random.normal(jax.random.key(3), (B, 5, F))
  rnns = [cls(nnx.SimpleCell(F, H, rngs=nnx.Rngs(0))) for cls in (nnx.RNN, _MyRNN)]
  for rnn in rnns:
    vars(rnn.cell.dense_h)["kernel"][...] = jax.random.normal(jax.random.key(7), (H, H))
    flaxnorm.nnx.wrap_modules(
      rnn, flaxnorm.nnx.spectral_norm, where=nnx.Linear, n_init_iterations=0
    )
  assert isinstance(rnns[1], _MyRNN) and type(rnns[1]) is not _MyRNN
  assert pickle.loads(pickle.dumps(type(rnns[1]))) is type(rnns[1])  # as a GraphDef holds it
  chex.assert_trees_all_close(*(_sigma_after_one_call(r, xs) for r in rnns), **TOL)
  flaxnorm.nnx.remove_spectral_norm(rnns[1])
  assert type(rnns[1]) is _MyRNN


def test_nnx_wrap_modules_leaves_other_rnns_as_they_are():
  # A cell layer wrapped on its own iterates at every time step (documented);
  # an unrelated wrap_modules call adopted every RNN of the model until
  # 2026-12-06, changing that silently.
  xs = jax.random.normal(jax.random.key(3), (B, 5, F))
  models = []
  for _ in range(2):
    model = nnx.Module()
    model.rnn = nnx.RNN(nnx.SimpleCell(F, H, rngs=nnx.Rngs(0)))
    model.head = nnx.Linear(H, 2, rngs=nnx.Rngs(1))
    vars(model.rnn.cell.dense_h)["kernel"][...] = jax.random.normal(jax.random.key(7), (H, H))
    flaxnorm.nnx.spectral_norm(model.rnn.cell.dense_h, n_init_iterations=0)
    models.append(model)
  flaxnorm.nnx.wrap_modules(
    models[1], flaxnorm.nnx.spectral_norm, where=nnx.All(nnx.PathContains("head"), nnx.Linear)
  )
  assert type(models[1].rnn) is nnx.RNN
  chex.assert_trees_all_close(*(_sigma_after_one_call(m.rnn, xs) for m in models), **TOL)
