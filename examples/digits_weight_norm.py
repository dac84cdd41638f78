"""Weight-normalized MLP on scikit-learn's digits, trained with optax.

Every ``nn.Dense`` is wrapped with ``flaxnorm.weight_norm``: its ``kernel`` param
becomes ``kernel_g`` (magnitude) and ``kernel_v`` (direction), which Adam trains
directly. After training, ``flaxnorm.remove_weight_norm`` folds them back into a
plain ``kernel`` so the same weights run in an ordinary ``nn.Dense`` model.

The data ship with scikit-learn (no download). Runs in a few seconds on a CPU
and exits non-zero if accuracy or the removal check fails, so it doubles as a
smoke test::

  python examples/digits_weight_norm.py
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxnorm

EPOCHS, BATCH, LR, SEED = 30, 64, 3e-3, 0


class MLP(nn.Module):
  hidden: tuple[int, ...] = (256, 128)
  n_classes: int = 10
  dense: type[nn.Module] = nn.Dense  # the layer class: plain or weight-normalized

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(self.dense(width)(x))
    return self.dense(self.n_classes)(x)


def main() -> int:
  start = time.perf_counter()
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)  # pixels are 0..16
  x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
  )

  # Transforming the class keeps Flax's auto-names ("Dense_0", ...), so the
  # plain model below finds the folded params at the very same paths.
  model = MLP(dense=flaxnorm.weight_norm(nn.Dense))
  key, init_key = jax.random.split(jax.random.key(SEED))
  params = model.init(init_key, x_train[:1])["params"]
  print("layer 0 params:", jax.tree.map(jnp.shape, params["Dense_0"]))

  tx = optax.adam(LR)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  n_batches = len(x_train) // BATCH  # drop the ragged last batch: one compiled shape
  for epoch in range(1, EPOCHS + 1):
    key, perm_key = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(perm_key, len(x_train)))
    losses = []
    for i in range(n_batches):
      idx = perm[i * BATCH : (i + 1) * BATCH]
      params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
      losses.append(loss)
    if epoch % 5 == 0 or epoch == 1:
      print(
        f"epoch {epoch:3d}  loss {float(jnp.mean(jnp.stack(losses))):.4f}  "
        f"train acc {float(accuracy(params, x_train, y_train)):.4f}  "
        f"test acc {float(accuracy(params, x_test, y_test)):.4f}"
      )

  # Fold g and v into plain kernels and check the plain model agrees.
  plain_params = flaxnorm.remove_weight_norm({"params": params})["params"]
  print("after removal:", jax.tree.map(jnp.shape, plain_params["Dense_0"]))
  logits_wn = model.apply({"params": params}, x_test)
  logits_plain = MLP().apply({"params": plain_params}, x_test)
  diff = float(jnp.max(jnp.abs(logits_wn - logits_plain)))
  acc = float(jnp.mean(jnp.argmax(logits_plain, -1) == y_test))
  print(f"max |logits(weight norm) - logits(plain Dense)| = {diff:.2e}")
  print(f"final test accuracy (plain model) = {acc:.4f}  [{time.perf_counter() - start:.1f} s]")

  ok = acc >= 0.9 and diff <= 1e-4
  if not ok:
    print("FAILED: accuracy < 0.9 or removal diff > 1e-4", file=sys.stderr)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
