"""What every face of the benchmark suite shares: the models' shapes, the data, the loss, a run.

A *run* is one variant (a library's normalization, or none) of one model,
reduced to a pure train step ``step(state, x, y) -> (state, loss)`` over a
pytree ``state`` (params, optimizer state, normalization state), so that the
runner can compile, time and inspect every library the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import _suite_shapes as shapes
import jax
import jax.numpy as jnp
import numpy as np
import optax


def data(model: str, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Inputs (channels last) and regression targets of one model's batch."""
  arch, batch = shapes.MODELS[model]
  kx, ky = jax.random.split(jax.random.key(1))
  x_shape, y_shape = {
    "mlp": ((batch, shapes.MLP_SIZES[0]), (batch, shapes.MLP_SIZES[-1])),
    "disc": ((batch, *shapes.DISC_IN), (batch, 1)),
    "gen": ((batch, shapes.GEN_FRAMES, shapes.GEN_IN), (batch, shapes.GEN_FRAMES * 256, 1)),
  }[arch]
  x = jax.random.normal(kx, x_shape, dtype)
  y = jax.random.normal(ky, y_shape, jnp.float32)
  return x, y


def mse(out: jax.Array, y: jax.Array) -> jax.Array:
  """The loss of every model (float32, whatever the compute dtype)."""
  return jnp.mean((out.astype(jnp.float32) - y) ** 2)


@dataclasses.dataclass
class Run:
  """One variant of one model, ready to compile.

  Attributes:
    step: the pure train step ``(state, x, y) -> (state, loss)``.
    state: its initial state.
    x, y: the batch.
    sigmas: ``state -> [(sigma_hat, W as a matrix), ...]`` for spectral norm (the stored
      estimate an eval call divides by, and the raw weight it estimates), else None.
    trace: a context manager factory entered while the step is traced (e.g. to force a side).
    donate: whether the step donates its state.
    normalized_bytes: bytes of the normalized weights (the memory target's allowance).
  """

  step: Callable
  state: Any
  x: jax.Array
  y: jax.Array
  sigmas: Callable | None = None
  trace: Callable | None = None
  donate: bool = False
  normalized_bytes: int = 0


def flattened(run: Run) -> Run:
  """``run`` over the flat list of its state's leaves.

  A compiled step flattens its input pytree and unflattens its output on every
  call, in Python. For a list of arrays that is the same small cost for every
  library; for an ``nnx.State`` it is not (the generator's: 1.0 ms a call plain,
  1.5 ms weight-normed, 2.5 ms spectral-normed, against 0.07-0.12 ms for Linen's
  dicts: 1-3% of the step, which is dispatch, not the library's math).
  """
  leaves, treedef = jax.tree.flatten(run.state)

  def step(leaves, x, y):
    state, loss = run.step(jax.tree.unflatten(treedef, leaves), x, y)
    new_leaves, new_def = jax.tree.flatten(state)
    if new_def != treedef:
      raise TypeError(f"the step changes its state's structure: {new_def} != {treedef}")
    return new_leaves, loss

  sigmas = run.sigmas
  return dataclasses.replace(
    run,
    step=step,
    state=leaves,
    sigmas=None if sigmas is None else lambda leaves: sigmas(jax.tree.unflatten(treedef, leaves)),
  )


def adam_step(loss_fn: Callable, tx, params, opt_state):
  """One optimizer step of ``loss_fn(params) -> (loss, aux)``: ``((params, opt_state, aux), loss)``.

  ``aux`` is what ``loss_fn`` returns beside the loss (e.g. the new normalization state).
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state, aux), loss


def as_matrix(w, out_axis: int = -1) -> np.ndarray:
  """A weight as a matrix (out, rest), float64, for the SVD."""
  w = np.asarray(w, np.float64)
  return np.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)


def kernel_bytes(params, names=("kernel", "kernel_v", "w", "weight")) -> int:
  """Bytes of the weights named like kernels in a params pytree."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    if name in names and getattr(leaf, "ndim", 0) >= 2:
      total += leaf.size * leaf.dtype.itemsize
  return total
