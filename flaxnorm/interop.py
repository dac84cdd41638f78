"""PyTorch checkpoint interop: weight-normed and spectral-normed layers, both ways.

PyTorch has written normalized weights under two key styles, and both are read
and written here (keys relative to the layer)::

  plain                      weight, bias
  weight norm, legacy        weight_g, weight_v                     (torch.nn.utils.weight_norm)
  weight norm, new           parametrizations.weight.original0 (g), .original1 (v)
                                                  (torch.nn.utils.parametrizations.weight_norm)
  spectral norm, legacy      weight_orig, weight_u, weight_v        (torch.nn.utils.spectral_norm)
  spectral norm, new         parametrizations.weight.original, parametrizations.weight.0._u,
                             parametrizations.weight.0._v
                                                  (torch.nn.utils.parametrizations.spectral_norm)

Layouts (``kind`` -> PyTorch weight -> Flax param)::

  linear            (out, in)                  nn.Dense kernel (in, out)
  conv1d/2d/3d      (out, in/groups, *k)       nn.Conv kernel (*k, in/groups, out)
  conv_transpose    (in, out, *k)              nn.ConvTranspose kernel (*k, in, out), spatially
  1d/2d/3d                                     flipped (Flax's default transpose_kernel=False;
                                               padding from conv_transpose_padding; groups=1:
                                               nn.ConvTranspose has no feature groups)
  embedding         (num, features)            nn.Embed embedding (num, features)

PyTorch's recurrent modules (``weight_ih_l0``, ``weight_hh_l0``, ...) and
``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``) load into and save
from Flax's LSTM, GRU and simple cells and Flax's attention modules with
:func:`load_torch_state_dict` and :func:`to_torch_state_dict` (not
:func:`from_torch`): each gate's (or q's, k's, v's) rows are a ``linear`` layer.

Which flaxnorm wrapping and ``axis`` reproduce the PyTorch layer is part of the
checkpoint, so :func:`from_torch` returns it (:class:`TorchLayer`), and
:func:`load_torch_state_dict` checks it against the Flax model (read from the
model itself, a Linen module traced shape-only or an NNX module, or from its
variables):

* Weight norm keeps PyTorch's ``dim``, read from ``g``'s shape: ``dim=0`` is the
  output axis for Linear/Conv (Flax ``axis=-1``) but the **input**-channel axis
  for ConvTranspose (Flax ``axis=-2``); ``dim=None`` is ``axis=None``.
* Spectral norm: PyTorch's two implementations run the power iteration in
  opposite orders. The legacy hook computes ``v = normalize(W^T u)`` then
  ``u = normalize(W v)``, as flaxnorm does, so it maps to the output axis (Flax
  ``axis=-1``). The parametrization computes ``u = normalize(W v)`` first; that
  is flaxnorm's iteration on the transposed matrix view, i.e. every axis but the
  output one (``axis=-2`` for Dense, ``(-3, -2)`` for a 1-D conv), with
  flaxnorm's ``u``/``v`` holding PyTorch's ``_v``/``_u``. With these axes a
  converted model continues the power iteration exactly where PyTorch left it.
  The other axis also loads with ``from_torch(..., axis=)``: evaluation is
  identical, but training steps then iterate in the other order, so
  :func:`load_torch_state_dict` refuses it unless ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from flaxnorm import _checks, _torch_convert, _torch_layouts, _torch_model, _torch_targets
from flaxnorm._checks import Axis
from flaxnorm._torch_convert import TorchLayer
from flaxnorm._torch_keys import STYLES
from flaxnorm._torch_layouts import KINDS
from flaxnorm._torch_model import KeyMap, TorchLoadResult
from flaxnorm._torch_plain import TorchParam

__all__ = (
  "KINDS",
  "STYLES",
  "KeyMap",
  "TorchLayer",
  "TorchLoadResult",
  "TorchParam",
  "conv_transpose_padding",
  "from_torch",
  "load_torch_state_dict",
  "to_torch",
  "to_torch_state_dict",
)


def from_torch(
  tensors: Mapping[str, Any],
  kind: str,
  *,
  axis: Axis = None,
  spectral_dim: int | None = None,
  collection: str = "spectral",
) -> TorchLayer:
  """Converts one PyTorch layer's tensors to flaxnorm variables for the matching Flax layer.

  Args:
    tensors: the layer's entries, keys relative to the layer (e.g.
      ``torch_layer.state_dict()``): ``weight``/``bias``, or a weight-norm or
      spectral-norm key set of either PyTorch API (see the module docstring).
      Values are torch tensors, numpy or JAX arrays; torch is not imported.
    kind: one of :data:`KINDS`: ``"linear"``, ``"conv1d"``/``"conv2d"``/``"conv3d"``,
      ``"conv_transpose1d"``/``2d``/``3d``, ``"embedding"``.
    axis: the flaxnorm ``axis`` the Flax layer is (to be) wrapped with. ``None``
      picks it: for weight norm PyTorch's ``dim`` (read from ``g``'s shape; any
      other axis raises, as the norm would differ); for spectral norm the axis
      that continues PyTorch's power iteration exactly. For new-style spectral
      norm the output axis (e.g. ``-1``) is also accepted: evaluation is the
      same, training steps iterate in flaxnorm's order. A ``g`` of all ones
      on a weight with several size-1 axes fits each (the same norm): ``axis``
      names one of them, else PyTorch's ``dim=0``.
    spectral_dim: the ``dim`` PyTorch's spectral norm was applied with (its
      default when ``None``: 1 for ConvTranspose, else 0).
    collection: the collection for the spectral state.

  Returns:
    A :class:`TorchLayer`: ``variables`` (jnp arrays in Flax layout, kernel
    ``(in, out)`` for ``linear``, ``(*k, in/groups, out)`` for convs and
    ConvTranspose, the latter flipped spatially) and the wrapping (``method``,
    ``axis``, ``name``; ``layer.wrap(nn.Dense(3))`` applies it). Spectral
    state: ``{name}_u`` ``(m,)``, ``{name}_v`` ``(n,)`` and
    ``{name}_sigma = u^T W v`` from the stored vectors.

  Raises:
    ValueError: unknown ``kind``; missing, unexpected or mixed-style keys; a
      shape that fits no layout of ``kind`` (the key, its shape and the
      expected layout are named); ``collection="params"``.
    TypeError: a value that is not an array.

  Examples:
    >>> import numpy as np
    >>> layer = from_torch({"weight_g": np.ones((3, 1, 1), np.float32),
    ...                     "weight_v": np.ones((3, 2, 4), np.float32)}, "conv_transpose1d")
    >>> layer.method, layer.axis, layer.variables["params"]["kernel_g"].shape
    ('weight_norm', -2, (1, 3, 1))
  """
  _checks.check_collection(collection, "from_torch")
  layer = _torch_convert.layer_from_torch(
    tensors, kind, axis, spectral_dim, collection, "from_torch"
  )[0]
  variables = {
    col: {key: jax.device_put(x) for key, x in d.items()} for col, d in layer.variables.items()
  }
  return layer._replace(variables=variables)


def to_torch(
  variables: Mapping[str, Any],
  kind: str,
  style: str = "parametrizations",
  *,
  axis: Axis = None,
  spectral_dim: int | None = None,
  collection: str = "spectral",
) -> dict[str, Any]:
  """Converts one Flax layer's flaxnorm variables to PyTorch tensors: the inverse of :func:`from_torch`.

  Args:
    variables: ``{"params": ..., collection: ...}`` of one layer (or its bare
      params, with the spectral state under ``collection`` beside them), plain, weight-normed (``{name}_g``/``{name}_v``) or
      spectral-normed (``{name}`` and ``{name}_u``/``{name}_v`` in
      ``collection``).
    kind: one of :data:`KINDS`.
    style: ``"parametrizations"`` (``torch.nn.utils.parametrizations``) or
      ``"legacy"`` (``torch.nn.utils.weight_norm``/``spectral_norm``). Both
      load with ``load_state_dict(strict=True)`` into a module built with that
      API (weight norm's legacy keys load into either). A plain weight gives
      ``weight``/``bias`` whatever the style; ``"plain"`` (what
      :func:`from_torch` reports for one) is accepted for it.
    axis: the flaxnorm ``axis`` the layer was wrapped with. Weight norm reads
      it from ``g``'s shape (a given one is checked). Spectral norm reads it
      from the shapes of ``u``/``v`` and needs it only when they have the same
      size. Where it is not the axis :func:`from_torch` picks for ``style``,
      evaluation matches but PyTorch's next training step iterates in its own
      order.
    spectral_dim: PyTorch's spectral-norm ``dim`` (its default when ``None``).
    collection: the collection holding the spectral state.

  Returns:
    ``{key: tensor}`` with keys relative to the layer, in PyTorch layout
    (``linear`` ``(out, in)``, conv ``(out, in/groups, *k)``, ConvTranspose
    ``(in, out, *k)``): torch tensors if torch can be imported, else numpy
    arrays.

  Raises:
    ValueError: unknown ``kind``/``style``, missing or unexpected params,
      shapes that fit no layout, or an ambiguous spectral view without ``axis``.

  Examples:
    >>> import numpy as np
    >>> params = {"kernel_g": np.ones((1, 3), np.float32),  # flaxnorm.weight_norm(nn.Dense(3))
    ...           "kernel_v": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}
    >>> sd = to_torch({"params": params}, "linear", "legacy")
    >>> {key: tuple(x.shape) for key, x in sorted(sd.items())}
    {'bias': (3,), 'weight_g': (3, 1), 'weight_v': (3, 4)}
  """
  _checks.check_collection(collection, "to_torch")
  arrays = _torch_convert.layer_to_numpy(variables, kind, style, axis, spectral_dim, collection)
  return _emit(arrays)


def conv_transpose_padding(
  kernel_size: int | tuple[int, ...],
  padding: int | tuple[int, ...] = 0,
  *,
  dilation: int | tuple[int, ...] = 1,
  output_padding: int | tuple[int, ...] = 0,
) -> tuple[tuple[int, int], ...]:
  """The ``padding`` of ``nn.ConvTranspose`` that matches a PyTorch ConvTranspose.

  With Flax's default ``transpose_kernel=False`` and the kernel from
  :func:`from_torch`, ``nn.ConvTranspose(features, kernel_size, strides=stride,
  kernel_dilation=dilation, padding=conv_transpose_padding(...))`` gives
  PyTorch's output (``groups=1``).

  Args:
    kernel_size: PyTorch's ``kernel_size`` (an int, or one per spatial dim).
    padding: PyTorch's ``padding``.
    dilation: PyTorch's ``dilation``.
    output_padding: PyTorch's ``output_padding``.

  Returns:
    ``((lo, hi), ...)`` per spatial dim: ``lo = dilation * (k - 1) - padding``,
    ``hi = lo + output_padding``.

  Raises:
    TypeError: an argument is not an int or a tuple of ints (a bool, a str).
    ValueError: ``kernel_size`` or ``dilation`` is below 1, ``padding`` or
      ``output_padding`` is negative, or one has another length than ``kernel_size``.

  Examples:
    >>> conv_transpose_padding(4, 1)
    ((2, 2),)
    >>> conv_transpose_padding((3, 4), (1, 2), dilation=(1, 2), output_padding=(1, 0))
    ((1, 2), (4, 4))
  """
  return _torch_layouts.conv_transpose_padding(kernel_size, padding, dilation, output_padding)


def load_torch_state_dict(
  state_dict: Mapping[str, Any],
  variables: Mapping[str, Any] | nn.Module | nnx.Module,
  key_map: KeyMap = None,
  *,
  inputs: Any = None,
  kwargs: Mapping[str, Any] | None = None,
  kinds: Mapping[str, str | None] | None = None,
  axes: Mapping[str, Axis] | None = None,
  strict: bool = True,
  collection: str = "spectral",
  spectral_dims: Mapping[str, int | None] | None = None,
) -> TorchLoadResult:
  """Fills a Flax model's variables from a full PyTorch state dict, in one call.

  Keys are grouped by layer (``"ups.0.weight_g"`` is layer ``"ups.0"``); each
  layer maps to a Flax path through ``key_map`` and is converted with
  :func:`from_torch`. A PyTorch ``nn.LSTM``/``nn.GRU``/``nn.RNN`` loads into
  Flax cells, one per layer and direction (``"lstm.l0"``, ``"lstm.l0_reverse"``,
  looked up as that name, as an index ``"lstm.0"``, then for one layer as
  ``"lstm"``; an ``nn.RNN``'s ``cell`` and an ``nn.Bidirectional``'s
  ``forward_rnn``/``backward_rnn`` are followed), its gates split into the
  cell's Dense layers or kept packed, its two biases summed where the cell has
  one (docs: porting, "Recurrent modules"). An ``nn.MultiheadAttention``
  (``in_proj_weight``, ``out_proj``) loads into a Flax attention module's
  ``query``, ``key``, ``value`` and ``out``, and any Linear into a
  ``DenseGeneral``/``LinearGeneral`` kernel through its ``(in, out)`` view. A
  prefix with an index that no Flax layer spells (``layers.3.fc``) may be a
  member of a stacked layer (``nn.scan``, ``nn.vmap``, ``nnx.vmap``): without
  the index (``layers.fc``) it names a Flax layer whose params have one
  leading axis more, and loads into that member's slice. A normalization
  layer (LayerNorm, GroupNorm, BatchNorm, RMSNorm, InstanceNorm) takes
  ``weight`` as its ``scale`` and a BatchNorm's ``running_mean``/``running_var``
  as its ``batch_stats`` ``mean``/``var``. The Flax side is the source of truth. Given the model
  (a Linen module with ``inputs``, traced shape-only with ``jax.eval_shape``;
  or an NNX module), each layer's kind (Dense, Conv, ConvTranspose, Embed),
  wrapping and ``axis`` are read from it, so ``kinds`` and ``axes`` are only
  overrides. Given variables (from ``model.init`` or ``jax.eval_shape`` of
  it), the wrapping is read from the tree and the spectral axis from the
  shapes of ``u``/``v``. Either way each layer is checked: a plain,
  weight-normed or spectral-normed target must meet the same in PyTorch, and
  every shape must match, ``g``'s included (a weight norm kept on another axis
  than PyTorch's ``dim`` is refused). A spectral layer whose axis iterates in
  the other order than the checkpoint's API is refused, since its next
  training step would differ from PyTorch's (``strict=False``: a warning);
  ``TorchLayer.continues`` reports each layer's order.

  Args:
    state_dict: PyTorch ``module.state_dict()`` (tensors or arrays).
    variables: the Flax model or the variables to fill. A Linen module (pass
      ``inputs``); an NNX module (it is not changed: apply the result with
      ``nnx.update(model, result.variables)``); or variables
      ``{"params": ..., collection: ...}`` whose values may be arrays,
      ``jax.ShapeDtypeStruct`` or boxed (``nn.Partitioned``). Loaded values
      take the target's dtype.
    key_map: PyTorch layer prefix -> Flax path. ``None`` (the default)
      follows the Flax tree: a PyTorch index ``ups.0`` becomes whichever of
      ``ups_0`` (a Linen list made in ``setup``), ``ups/layers_0``
      (``nn.Sequential``) and ``ups/0`` (an NNX list) exists; several is an
      error that lists them. A dict of prefixes ``{"generator": "gen", ...}``:
      the longest key that is the prefix or a ``.``-bounded start of it wins,
      and the rest of the prefix follows the tree below its value; prefixes
      matching no key are skipped. A function returning ``"a/b"`` (or a tuple
      of names, or ``None`` to skip the layer).
    inputs: a Linen model's example inputs (an array or
      ``jax.ShapeDtypeStruct``, or a tuple of its ``__call__`` arguments;
      Python scalars among them, such as a train flag, are passed as they are).
    kwargs: a Linen model's keyword arguments (``{"train": False}``), passed
      or traced as ``inputs`` are.
    kinds: PyTorch layer prefix -> kind (one of :data:`KINDS`; ``None`` means
      not given). A prefix covers the layers below it too (``{"ups":
      "conv_transpose1d"}`` names ``ups.0``, ``ups.1``, ...; the longest
      wins). Without it: the Flax model's layer class (an entry naming another
      family than the model's class is an error); without a model,
      ``embedding`` when the Flax layer has an ``embedding``, else by rank
      ``linear``, ``conv1d``, ``conv2d``, ``conv3d`` (a ConvTranspose must
      then be named; a conv with as many input as output channels fits both
      layouts, and is refused unless ``kinds`` covers it: ``{"": "conv1d",
      "ups": "conv_transpose1d"}`` names every layer).
    axes: PyTorch layer prefix -> the flaxnorm axis the Flax layer is wrapped
      with (``None``: not given; prefixes as for ``kinds``; an entry other than
      the model's own wrapping is an error). Without it: the model's, else read from the
      shapes of ``u``/``v`` (a square layer without a model needs it).
    strict: raise if any PyTorch key is unused, any Flax variable unfilled,
      or a spectral layer iterates in the other order than PyTorch's. With
      ``False`` they are reported (the order with a ``UserWarning``), and a
      Linen model's unfilled variables take its initial values
      (``jax.random.key(0)``). Tensors of no supported layer (a Snake
      ``alpha``, a bias alone) load into the Flax param of the same path and
      name, if there is one of the same shape, or a vector's shape where the
      tensor's other axes have size 1 (``(1, C, 1)`` for ``(C,)``); they are
      listed in ``TorchLoadResult.params``.
    collection: the collection holding the spectral state.
    spectral_dims: PyTorch layer prefix -> the ``dim`` its ``spectral_norm``
      was applied with (``None``: the default, 1 for ConvTranspose, else 0;
      prefixes as for ``kinds``). A square layer's vectors cannot tell it:
      pass it whenever PyTorch's was not the default.

  Returns:
    A :class:`TorchLoadResult`: the new variables (an ``nnx.State`` for an
    NNX model), the converted layers, the unused PyTorch keys and unmatched
    Flax variables; ``result.summary()`` prints one line per layer.

  Raises:
    ValueError: a shape, kind or wrapping mismatch (naming the PyTorch key,
      the Flax path, both shapes and the expected layouts); an ambiguous key
      match; a spectral layer in the other iteration order (with ``strict``);
      with ``strict``, unused keys or unmatched variables (all listed in one
      error); ``collection="params"``, or a ``collection`` the variables lack
      while a PyTorch layer has spectral state.
    TypeError: an argument of the wrong type: ``state_dict`` or ``kinds``/``axes``
      not a mapping, ``strict`` not a bool, a module class for ``variables``,
      a ``key_map`` of the wrong type.

  Examples:
    >>> import flax.linen as nn, jax.numpy as jnp, numpy as np
    >>> import flaxnorm
    >>> class Net(nn.Module):
    ...   def setup(self):  # Linen names these "ups_0", "ups_1"
    ...     self.ups = [flaxnorm.weight_norm(nn.ConvTranspose(2, (4,)), axis=-2) for _ in range(2)]
    ...   def __call__(self, x):
    ...     for up in self.ups:
    ...       x = up(x)
    ...     return x
    >>> f32 = lambda *shape: np.ones(shape, np.float32)
    >>> state_dict = {f"ups.{i}.{key}": x for i in range(2) for key, x in
    ...               {"weight_g": f32(2, 1, 1), "weight_v": f32(2, 2, 4), "bias": f32(2)}.items()}
    >>> result = load_torch_state_dict(state_dict, Net(), inputs=jnp.zeros((1, 5, 2)))
    >>> print(result.summary())
    ups.0 -> ups_0  conv_transpose1d  weight_norm(axis=-2)  legacy keys
    ups.1 -> ups_1  conv_transpose1d  weight_norm(axis=-2)  legacy keys
    >>> result.variables["params"]["ups_0"]["kernel_v"].shape
    (4, 2, 2)
  """
  call = _torch_targets.linen_call(inputs, kwargs, "load_torch_state_dict")
  return _torch_model.load(
    state_dict, variables, key_map, (kinds, axes, call, spectral_dims), strict, collection
  )


def to_torch_state_dict(
  variables: Mapping[str, Any] | nnx.Module,
  layers: Mapping[str, TorchLayer] | None = None,
  *,
  model: nn.Module | None = None,
  inputs: Any = None,
  kwargs: Mapping[str, Any] | None = None,
  style: str | None = None,
  collection: str = "spectral",
  spectral_dims: Mapping[str, int | None] | None = None,
  params: Mapping[str, TorchParam | str] | None = None,
) -> dict[str, Any]:
  """Writes a PyTorch state dict from Flax variables: the inverse of :func:`load_torch_state_dict`.

  Args:
    variables: Flax variables (``{"params": ..., collection: ...}``), an NNX
      model (its ``nnx.Param`` and spectral-state leaves are read), or an NNX
      model's ``nnx.State`` (``TorchLoadResult.variables`` of an NNX load). A
      spectral layer's state must be there: its kernel is the weight before
      the norm.
    layers: PyTorch layer prefix -> :class:`TorchLayer` giving the Flax
      ``path``, ``kind``, ``axis`` and ``style`` (``TorchLoadResult.layers``).
      ``None``: read from the model (an NNX ``variables``, or ``model`` and
      ``inputs``), every Dense/Conv/ConvTranspose/Embed layer with PyTorch's
      naming of its path (``ups/0``, ``ups/layers_0``, ``ups/layers/0`` and a
      Linen list's ``ups_0`` -> ``ups.0``; ``conv_1`` without ``conv_0`` and
      NNX names are kept); a
      spectral layer gets the key style whose power iteration its axis
      continues, other layers the parametrizations style.
    model: a Linen module to read the layers from (with ``inputs``, its
      example inputs, as for :func:`load_torch_state_dict`).
    inputs: the Linen ``model``'s example inputs.
    kwargs: the Linen ``model``'s keyword arguments, as for
      :func:`load_torch_state_dict`.
    style: a key style for every layer, or ``None`` for each layer's own.
    collection: the collection holding the spectral state.
    spectral_dims: PyTorch layer prefix -> the ``dim`` of its PyTorch
      ``spectral_norm``, as for :func:`load_torch_state_dict`. Without an
      entry: the ``TorchLayer``'s ``spectral_dim`` (what it was loaded
      with), else PyTorch's default.
    params: PyTorch key -> :class:`TorchParam` (``TorchLoadResult.params``)
      or Flax path (``"act/alpha"``): tensors of no layer (a Snake
      ``alpha``), written from the Flax param of that path in the
      ``TorchParam``'s shape (else the param's). Only layers are written
      without it.

  Returns:
    ``{"prefix.key": tensor}`` (torch tensors, or numpy without torch).

  Raises:
    ValueError: a layer whose ``path`` is not in ``variables``; neither
      ``layers`` nor a model; a ``params`` path with no Flax param, a shape
      it cannot take, or a key a layer writes; or what :func:`to_torch`
      raises for one layer.
    TypeError: ``params`` not a mapping of key -> ``TorchParam`` or path.

  Examples:
    >>> import numpy as np
    >>> f32 = lambda *shape: np.ones(shape, np.float32)
    >>> state_dict = {"fc.weight_g": f32(3, 1), "fc.weight_v": f32(3, 4), "fc.bias": f32(3)}
    >>> variables = {"params": {"fc": {"kernel_g": f32(1, 3), "kernel_v": f32(4, 3),
    ...                                "bias": f32(3)}}}
    >>> result = load_torch_state_dict(state_dict, variables, None)
    >>> sorted(to_torch_state_dict(result.variables, result.layers))
    ['fc.bias', 'fc.weight_g', 'fc.weight_v']
    >>> sorted(to_torch_state_dict(result.variables, result.layers, style="parametrizations"))
    ['fc.bias', 'fc.parametrizations.weight.original0', 'fc.parametrizations.weight.original1']
  """
  call = _torch_targets.linen_call(inputs, kwargs, "to_torch_state_dict")
  return _emit(
    _torch_model.save(variables, layers, style, collection, model, call, spectral_dims, params)
  )


# --------------------------------------------------------------------------- #
# numpy -> torch: the one place torch is imported.
# --------------------------------------------------------------------------- #


def _import_torch() -> Any:
  """The torch module, or ``None`` where it is not installed (a test seam too)."""
  try:
    import torch
  except ImportError:
    return None
  return torch


def _emit(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Torch tensors (copies) of numpy arrays, keeping the dtype; numpy without torch."""
  torch = _import_torch()
  if torch is None:
    return {key: np.array(x) for key, x in arrays.items()}
  out = {}
  for key, x in arrays.items():
    x = np.asarray(x)
    if x.dtype in (np.float16, np.float32, np.float64):
      out[key] = torch.from_numpy(np.array(x))
    else:  # bfloat16 and friends: numpy cannot hand them to torch directly
      out[key] = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, x.dtype.name))
  return out
