"""PyTorch nn.LSTM / nn.GRU / nn.RNN state dicts in and out of Flax cells, with parity.

Each parity test runs PyTorch's module and the loaded Flax model on the same
sequence, then writes the Flax variables back and loads them into the PyTorch
module with ``strict=True``, which must give the same outputs again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnnx
from flaxnorm import _torch_rnn, interop

IN, H, T, B = 3, 4, 5, 2
X = np.random.RandomState(0).randn(B, T, IN).astype(np.float32)
TOL = 2e-6


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _holder(torch, module, name="rnn"):
  """A PyTorch module holding ``module`` as ``name``, called batch-first on X."""
  holder = torch.nn.Module()
  setattr(holder, name, module)
  return holder


def _torch_out(torch, module):
  module.eval()
  with torch.no_grad():
    return module(torch.from_numpy(X))[0].numpy()


def _round_trip(torch, module, result, want, name="rnn"):
  """Writes the loaded variables back into ``module`` (strict) and checks its outputs again."""
  back = interop.to_torch_state_dict(result.variables, result.layers)
  _holder(torch, module, name).load_state_dict(back, strict=True)
  np.testing.assert_allclose(_torch_out(torch, module), want, atol=TOL)


class _LinenRNN(nn.Module):
  make: Callable[[], nn.Module]  # the cell, made in setup so that it is rnn/cell

  def setup(self):
    self.rnn = nn.RNN(self.make())

  def __call__(self, x):
    return self.rnn(x)


class _NnxRNN(nnx.Module):
  def __init__(self, cell):
    self.rnn = nnx.RNN(cell)

  def __call__(self, x):
    return self.rnn(x)


def _nnx_out(model, state):
  nnx.update(model, state)
  model.eval()
  return np.asarray(model(jnp.asarray(X)))


TORCH = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
LINEN_CELLS = {
  "LSTMCell": ("lstm", nn.LSTMCell),
  "OptimizedLSTMCell": ("lstm", nn.OptimizedLSTMCell),
  "GRUCell": ("gru", nn.GRUCell),
  "SimpleCell": ("rnn", nn.SimpleCell),
}
NNX_CELLS = {
  "LSTMCell": ("lstm", nnx.LSTMCell),
  "OptimizedLSTMCell": ("lstm", nnx.OptimizedLSTMCell),
  "GRUCell": ("gru", nnx.GRUCell),
  "SimpleCell": ("rnn", nnx.SimpleCell),
}


def _make(torch, kind, seed=0, **kwargs):
  torch.manual_seed(seed)
  return getattr(torch.nn, TORCH[kind])(IN, H, batch_first=True, **kwargs)


# --------------------------------------------------------------------------- #
# Plain weights: every cell of both faces.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("cell", sorted(LINEN_CELLS))
def test_linen_cell_matches_torch_both_ways(torch, cell):
  kind, cls = LINEN_CELLS[cell]
  t = _make(torch, kind)
  want = _torch_out(torch, t)
  model = _LinenRNN(lambda: cls(H))
  result = interop.load_torch_state_dict(_holder(torch, t).state_dict(), model, inputs=X)
  assert sorted(result.layers) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]
  assert {(x.kind, x.path, x.method, x.bias) for x in result.layers.values()} == {
    (kind, "rnn/cell", None, True)
  }
  np.testing.assert_allclose(model.apply(result.variables, X), want, atol=TOL)
  _round_trip(torch, t, result, want)


@pytest.mark.parametrize("cell", sorted(NNX_CELLS))
def test_nnx_cell_matches_torch_both_ways(torch, cell):
  kind, cls = NNX_CELLS[cell]
  t = _make(torch, kind)
  if kind == "gru":  # NNX's GRUCell has no b_hn (see the test below)
    with torch.no_grad():
      t.bias_hh_l0[2 * H :] = 0
  want = _torch_out(torch, t)
  model = _NnxRNN(cls(IN, H, rngs=nnx.Rngs(0)))
  result = interop.load_torch_state_dict(_holder(torch, t).state_dict(), model)
  np.testing.assert_allclose(_nnx_out(model, result.variables), want, atol=TOL)
  _round_trip(torch, t, result, want)
  # Read from the model, without the load's layers: the same keys and values.
  chex.assert_trees_all_close(
    {k: np.asarray(x) for k, x in interop.to_torch_state_dict(model).items()},
    {
      k: np.asarray(x)
      for k, x in interop.to_torch_state_dict(result.variables, result.layers).items()
    },
  )


def test_bias_parts_are_moved_not_dropped(torch):
  """Flax keeps one bias per summed gate: PyTorch's b_ih + b_hh, and a GRU's b_hn apart."""
  t = _make(torch, "gru")
  result = interop.load_torch_state_dict(
    _holder(torch, t).state_dict(), _LinenRNN(lambda: nn.GRUCell(H)), inputs=X
  )
  cell = result.variables["params"]["rnn"]["cell"]
  b_ih, b_hh = (t.bias_ih_l0.detach().numpy(), t.bias_hh_l0.detach().numpy())
  np.testing.assert_allclose(cell["ir"]["bias"], b_ih[:H] + b_hh[:H], atol=1e-7)
  np.testing.assert_allclose(cell["iz"]["bias"], b_ih[H : 2 * H] + b_hh[H : 2 * H], atol=1e-7)
  np.testing.assert_allclose(cell["in"]["bias"], b_ih[2 * H :])
  np.testing.assert_allclose(cell["hn"]["bias"], b_hh[2 * H :])
  back = interop.to_torch_state_dict(result.variables, result.layers)
  np.testing.assert_allclose(back["rnn.bias_hh_l0"][: 2 * H].numpy(), 0)  # written on ih
  np.testing.assert_allclose(back["rnn.bias_hh_l0"][2 * H :].numpy(), b_hh[2 * H :])


def test_nnx_gru_refuses_a_reset_bias_it_cannot_hold(torch):
  t = _make(torch, "gru")  # b_hn is nonzero
  model = _NnxRNN(nnx.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'rnn.l0' -> 'params/rnn/cell'.*gate 'n' \(hh\).*b_hn"):
    interop.load_torch_state_dict(_holder(torch, t).state_dict(), model)


def test_no_bias_loads_zeros_and_writes_no_bias(torch):
  t = _make(torch, "lstm", bias=False)
  want = _torch_out(torch, t)
  model = _LinenRNN(lambda: nn.LSTMCell(H))
  result = interop.load_torch_state_dict(_holder(torch, t).state_dict(), model, inputs=X)
  assert all(layer.bias is False for layer in result.layers.values())
  cell = result.variables["params"]["rnn"]["cell"]
  for gate in "ifgo":
    np.testing.assert_array_equal(cell[f"h{gate}"]["bias"], 0)
  np.testing.assert_allclose(model.apply(result.variables, X), want, atol=TOL)
  back = interop.to_torch_state_dict(result.variables, result.layers)
  assert sorted(back) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]
  _round_trip(torch, t, result, want)


class _Stack(nn.Module):
  """Two bidirectional LSTM layers, as a Linen list: lstm_0, lstm_1."""

  def setup(self):
    self.lstm = [nn.Bidirectional(nn.RNN(nn.LSTMCell(H)), nn.RNN(nn.LSTMCell(H))) for _ in range(2)]

  def __call__(self, x):
    for layer in self.lstm:
      x = layer(x)
    return x


def test_two_layer_bidirectional_lstm(torch):
  t = _make(torch, "lstm", num_layers=2, bidirectional=True)
  want = _torch_out(torch, t)
  result = interop.load_torch_state_dict(_holder(torch, t, "lstm").state_dict(), _Stack(), inputs=X)
  assert result.layers["lstm.weight_hh_l1_reverse"].path == "lstm_1/backward_rnn/cell"
  assert result.layers["lstm.weight_ih_l1"].path == "lstm_1/forward_rnn/cell"
  np.testing.assert_allclose(_Stack().apply(result.variables, X), want, atol=TOL)
  _round_trip(torch, t, result, want, "lstm")


def test_key_map_names_a_cell(torch):
  """A compact Linen model names its cell LSTMCell_0: key_map points there."""

  class Compact(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.RNN(nn.LSTMCell(H))(x)

  t = _make(torch, "lstm")
  sd = _holder(torch, t, "enc").state_dict()
  with pytest.raises(ValueError, match=r"enc.weight_ih_l0: recurrent layer 'enc.l0': no Flax cell"):
    interop.load_torch_state_dict(sd, Compact(), inputs=X)
  result = interop.load_torch_state_dict(sd, Compact(), {"enc.l0": "LSTMCell_0"}, inputs=X)
  np.testing.assert_allclose(Compact().apply(result.variables, X), _torch_out(torch, t), atol=TOL)
  skipped = interop.load_torch_state_dict(sd, Compact(), {"other": "x"}, inputs=X, strict=False)
  assert set(skipped.unused_keys) == set(sd) and not skipped.layers


def test_linen_model_saves_cells_as_recurrent_modules():
  """Without layers, a model's cells are written as one-layer PyTorch modules, and load back."""
  variables = _Stack().init(jax.random.key(0), X)
  sd = interop.to_torch_state_dict(variables, model=_Stack(), inputs=X)
  assert sorted(sd)[:4] == [
    "lstm.0.bias_hh_l0",
    "lstm.0.bias_hh_l0_reverse",
    "lstm.0.bias_ih_l0",
    "lstm.0.bias_ih_l0_reverse",
  ]
  assert sd["lstm.1.weight_ih_l0"].shape == (4 * H, 2 * H)
  result = interop.load_torch_state_dict(sd, _Stack(), inputs=X)
  chex.assert_trees_all_close(result.variables, variables)


# --------------------------------------------------------------------------- #
# Weight norm and spectral norm on the recurrent weights.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("api", ["legacy", "parametrizations"])
def test_weight_norm_into_per_gate_dense(torch, api):
  wn = (
    torch.nn.utils.weight_norm if api == "legacy" else torch.nn.utils.parametrizations.weight_norm
  )
  t = _make(torch, "lstm")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated
    for name in ("weight_ih_l0", "weight_hh_l0"):
      wn(t, name=name)
  with torch.no_grad():  # move g away from ||v||, so that the test sees g
    for g in [p for n, p in t.named_parameters() if n.endswith(("_g", "original0"))]:
      g.mul_(torch.linspace(0.5, 2.0, 4 * H).reshape(-1, 1))
  want = _torch_out(torch, t)
  model = _LinenRNN(lambda: flaxnorm.weight_norm(nn.LSTMCell(H), recursive=True))
  result = interop.load_torch_state_dict(_holder(torch, t).state_dict(), model, inputs=X)
  layer = result.layers["rnn.weight_hh_l0"]
  assert (layer.method, layer.axis, layer.style) == ("weight_norm", -1, api)
  assert result.variables["params"]["rnn"]["cell"]["hf"]["kernel_g"].shape == (1, H)
  np.testing.assert_allclose(model.apply(result.variables, X), want, atol=TOL)
  _round_trip(torch, t, result, want)


@pytest.mark.parametrize("api", ["legacy", "parametrizations"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_spectral_norm_into_packed_nnx_cell_continues_the_iteration(torch, api, kind):
  sn = (
    torch.nn.utils.spectral_norm
    if api == "legacy"
    else torch.nn.utils.parametrizations.spectral_norm
  )
  t = _make(torch, kind)
  for name in ("weight_ih_l0", "weight_hh_l0"):
    sn(t, name=name)
  with torch.no_grad():
    if kind == "gru":
      t.bias_hh_l0[2 * H :] = 0
    t.train()
    t(torch.from_numpy(X))  # one power-iteration step, so that u, v are not PyTorch's initial ones
  want = _torch_out(torch, t)
  cell = (nnx.OptimizedLSTMCell if kind == "lstm" else nnx.GRUCell)(IN, H, rngs=nnx.Rngs(0))
  axis = -1 if api == "legacy" else -2  # the axis whose order continues PyTorch's
  model = fnnx.wrap_modules(_NnxRNN(cell), fnnx.spectral_norm, where=nnx.Linear, axis=axis)
  result = interop.load_torch_state_dict(_holder(torch, t).state_dict(), model)
  assert result.layers["rnn.weight_hh_l0"].continues == api
  np.testing.assert_allclose(_nnx_out(model, result.variables), want, atol=TOL)
  # A training step in each: the same new state.
  t.train()
  with torch.no_grad():
    t(torch.from_numpy(X))
  model.train()
  model(jnp.asarray(X))
  # Float error of the two steps, amplified by the iteration, is below 1e-4; iterating at every
  # time step instead of once per call moves u by about 0.1.
  key = "weight_hh_l0_u" if api == "legacy" else "parametrizations.weight_hh_l0.0._u"
  got = interop.to_torch_state_dict(model)
  np.testing.assert_allclose(got[f"rnn.{key}"].numpy(), t.state_dict()[key].numpy(), atol=1e-4)
  _round_trip(torch, t, result, want)


def test_packed_normalizations_refused_by_per_gate_cells(torch):
  t = _make(torch, "lstm")
  torch.nn.utils.spectral_norm(t, name="weight_ih_l0")
  model = _LinenRNN(lambda: flaxnorm.spectral_norm(nn.LSTMCell(H), recursive=True))
  with pytest.raises(ValueError, match=r"divides all 4 gates of 'rnn.weight_ih_l0' by one sigma"):
    interop.load_torch_state_dict(_holder(torch, t).state_dict(), model, inputs=X)
  t = _make(torch, "lstm")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    torch.nn.utils.weight_norm(t, name="weight_ih_l0", dim=None)
  model = _LinenRNN(lambda: flaxnorm.weight_norm(nn.LSTMCell(H), recursive=True))
  with pytest.raises(ValueError, match=r"g of shape \(\): dim is not 0\) takes its norms across"):
    interop.load_torch_state_dict(_holder(torch, t).state_dict(), model, inputs=X)


# --------------------------------------------------------------------------- #
# Bad inputs, without torch.
# --------------------------------------------------------------------------- #


def _sd(kind="lstm", hidden=H, inputs=IN, **extra):
  g = len(_torch_rnn.GATES[kind])
  rng = np.random.RandomState(1)
  sd = {
    "rnn.weight_ih_l0": rng.randn(g * hidden, inputs).astype(np.float32),
    "rnn.weight_hh_l0": rng.randn(g * hidden, hidden).astype(np.float32),
    "rnn.bias_ih_l0": rng.randn(g * hidden).astype(np.float32),
    "rnn.bias_hh_l0": rng.randn(g * hidden).astype(np.float32),
  }
  return {**sd, **extra}


def _variables(cell):
  return _LinenRNN(cell.clone).init(jax.random.key(0), X)


def test_numpy_state_dict_loads_without_torch():
  sd = _sd("gru")
  result = interop.load_torch_state_dict(sd, _variables(nn.GRUCell(H)))
  kernel = result.variables["params"]["rnn"]["cell"]["hz"]["kernel"]
  np.testing.assert_array_equal(kernel, sd["rnn.weight_hh_l0"][H : 2 * H].T)


@pytest.mark.parametrize(
  ("sd", "cell", "match"),
  [
    (
      _sd("gru"),
      nn.LSTMCell(H),
      r"PyTorch's is an nn.GRU layer, but the Flax module there has "
      r"\['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io'\]; expected a cell with Linen GRUCell",
    ),
    (
      _sd(**{"rnn.weight_hr_l0": np.zeros((2, H), np.float32)}),
      nn.LSTMCell(H),
      r"'rnn.weight_hr_l0' is an LSTM projection \(proj_size > 0\)",
    ),
    (
      {"rnn.weight_ih_l0": np.zeros((4 * H, IN), np.float32)},
      nn.LSTMCell(H),
      r"no 'rnn.weight_hh_l0' among its keys \['rnn.weight_ih_l0'\]",
    ),
    (
      _sd(**{"rnn.weight_hh_l0": np.zeros((4 * H, H + 1), np.float32)}),
      nn.LSTMCell(H),
      r"'rnn.weight_hh_l0' has shape \(16, 5\), which is \(G\*hidden, hidden\) for no G",
    ),
    (
      _sd(**{"rnn.bias_ih_l0": np.zeros(3, np.float32)}),
      nn.LSTMCell(H),
      r"'rnn.bias_ih_l0' has shape \(3,\), expected \(16,\)",
    ),
    (
      _sd(hidden=H + 1),
      nn.LSTMCell(H),
      r"'rnn.weight_ih_l0\[i\]' -> 'params/rnn/cell/ii'.*shape mismatch",
    ),
  ],
  ids=["kind", "projection", "one_side", "not_gates", "bias_shape", "hidden_size"],
)
def test_bad_recurrent_state_dicts(sd, cell, match):
  with pytest.raises(ValueError, match=match):
    interop.load_torch_state_dict(sd, _variables(cell))


def test_save_refuses_a_prefix_that_is_no_recurrent_weight():
  variables = _variables(nn.LSTMCell(H))
  result = interop.load_torch_state_dict(_sd(), variables)
  layers = {"rnn.cell": result.layers["rnn.weight_ih_l0"]}
  with pytest.raises(ValueError, match=r"'rnn.cell' -> 'params/rnn/cell': a lstm layer's prefix"):
    interop.to_torch_state_dict(result.variables, layers)


@pytest.mark.parametrize(
  "key",
  [
    "weight_ih_l0",
    "lstm.weight_hh_l12_reverse",
    "a.b.weight_hh_l0_g",
    "weight_ih_l1_v",
    "enc.weight_hh_l0_orig",
    "enc.weight_hh_l0_u",
    "enc.parametrizations.weight_ih_l0.original0",
    "parametrizations.weight_hh_l3_reverse.0._u",
    "gru.bias_ih_l0",
  ],
)
def test_rnn_keys_round_trip(key):
  rk = _torch_rnn.split_rnn_key(key)
  assert rk is not None
  assert _torch_rnn.join(rk.module, _torch_rnn.rnn_key(rk.key, rk.param)) == key


@pytest.mark.parametrize(
  "key", ["weight", "fc.weight_g", "weight_ih", "rnn.weight_ih_lx", "x.bias"]
)
def test_other_keys_are_no_rnn_keys(key):
  assert _torch_rnn.split_rnn_key(key) is None


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_weight_norm_into_nnx_cells(torch, cell):
  """Per-gate (NNX LSTMCell) or packed (NNX GRUCell) Linears weight-normed by wrap_modules."""
  kind, cls = NNX_CELLS[cell]
  t = _make(torch, kind)
  for name in ("weight_ih_l0", "weight_hh_l0"):
    torch.nn.utils.parametrizations.weight_norm(t, name=name)
  with torch.no_grad():
    t.bias_hh_l0[2 * H :] = 0  # (NNX's GRUCell has no b_hn; for the LSTM, gate o's bias)
  want = _torch_out(torch, t)
  model = fnnx.wrap_modules(
    _NnxRNN(cls(IN, H, rngs=nnx.Rngs(0))), fnnx.weight_norm, where=nnx.Linear
  )
  result = interop.load_torch_state_dict(_holder(torch, t).state_dict(), model)
  assert result.layers["rnn.weight_hh_l0"].method == "weight_norm"
  np.testing.assert_allclose(_nnx_out(model, result.variables), want, atol=TOL)
  got = interop.to_torch_state_dict(model)  # from the model: the same keys
  _holder(torch, t).load_state_dict(got, strict=True)
  np.testing.assert_allclose(_torch_out(torch, t), want, atol=TOL)


def test_a_port_that_keeps_pytorchs_names_loads_by_name():
  """A Flax module of one's own with params named weight_ih_l0, ... (no Flax cell) takes them
  as they are, as before recurrent modules were mapped; so does one with in_proj_weight."""
  sd = _sd("gru")
  variables = {"params": {"rnn": {k.split(".")[1]: np.zeros_like(x) for k, x in sd.items()}}}
  result = interop.load_torch_state_dict(sd, variables)
  assert sorted(result.params) == sorted(sd) and not result.layers
  np.testing.assert_array_equal(
    result.variables["params"]["rnn"]["weight_hh_l0"], sd["rnn.weight_hh_l0"]
  )
  attn = {
    "attn.in_proj_weight": np.ones((6, 2), np.float32),
    "attn.in_proj_bias": np.ones(6, np.float32),
    "attn.out_proj.weight": np.ones((2, 2), np.float32),  # a Linear of its own here
  }
  own = {"params": {"attn": {"in_proj_weight": np.zeros((6, 2)), "in_proj_bias": np.zeros(6)}}}
  own["params"]["attn"]["out_proj"] = {"kernel": np.zeros((2, 2), np.float32)}
  result = interop.load_torch_state_dict(attn, own)
  assert sorted(result.params) == ["attn.in_proj_bias", "attn.in_proj_weight"]
  assert result.layers["attn.out_proj"].kind == "linear"


def test_bfloat16_cell_writes_bfloat16_biases(torch):
  """The zeros written for the side Flax keeps no bias on take the weight's dtype."""
  t = _make(torch, "lstm").to(torch.bfloat16)
  model = _LinenRNN(lambda: nn.LSTMCell(H, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
  result = interop.load_torch_state_dict(
    _holder(torch, t).state_dict(), model, inputs=jnp.ones((1, T, IN), jnp.bfloat16)
  )
  back = interop.to_torch_state_dict(result.variables, result.layers)
  assert {x.dtype for x in back.values()} == {torch.bfloat16}
  _holder(torch, t).load_state_dict(back, strict=True)


def test_residual_simple_cell_is_refused_both_ways():
  """SimpleCell(residual=True) adds the carry each step; PyTorch's nn.RNN never does."""
  model = _LinenRNN(lambda: nn.SimpleCell(H, residual=True))
  with pytest.raises(
    ValueError, match=r"'rnn.l0' -> 'params/rnn/cell': the Flax SimpleCell: residual=True"
  ):
    interop.load_torch_state_dict(_sd("rnn"), model, inputs=X)
  variables = model.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"SimpleCell at 'params/rnn/cell': residual=True"):
    interop.to_torch_state_dict(variables, model=model, inputs=X)
