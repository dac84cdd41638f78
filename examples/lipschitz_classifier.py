"""A Lipschitz-constrained classifier: operator-mode spectral norm with ``mode="clip"``.

Two MLPs (2 -> 64 -> 64 -> 64 -> 1, tanh) learn two interleaved moons from the
same seed, batches and optimizer; the only difference is the layer class. In
the constrained one every ``nn.Dense`` is
``flaxnorm.spectral_norm(nn.Dense, operator=True, mode="clip", target=TARGET)``:
it uses ``kernel * min(1, TARGET / sigma)``, sigma being the norm of the layer's
own linear map from a power iteration whose state lives in the ``spectral``
collection. The jitted step threads that state (``mutable=["spectral"]``);
evaluation uses it as stored. tanh is 1-Lipschitz, so the network is about
``TARGET ** 4``-Lipschitz at most (``bound.estimate``; the stored sigmas are
power-iteration estimates), and ``flaxnorm.lipschitz_bound(variables,
model=..., inputs=...)`` certifies a bound from the trained kernels (Gram
iteration): ``bound.certified``.

The empirical Lipschitz constant of the logit ``f`` is the largest input-gradient
norm ``||df/dx||`` found: over the data, and by projected gradient ascent on
``||df/dx||^2`` in a box around the data (restarts at random points and at the
data's worst points). It is a lower bound of the true constant; the certified
bound is an upper one, so the script exits non-zero if the search ever goes
above it. Nothing bounds the plain MLP's input gradients: the logistic loss keeps
sharpening its boundary.

It prints each model's test accuracy, the bounds, the empirical constants and
the test accuracy certified at radius ``RADIUS`` (``|f(x)| > L * RADIUS``, so
no perturbation that small can flip the class), and writes
``lipschitz_classifier.png`` (each model's logit and decision boundary, and the
bounds against the empirical constants) to ``--out``. Run (about half a minute
on 2 CPU cores)::

  python examples/lipschitz_classifier.py [--steps 2000] [--out out/lipschitz_classifier]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
from tqdm import tqdm

import flaxnorm

N_TRAIN, N_TEST, NOISE, RADIUS = 512, 1024, 0.1, 0.1
FEATURES, TARGET = (64, 64, 64, 1), 2.0  # 4 layers: about 2**4 = 16-Lipschitz at most
STEPS, BATCH, LR, SEED, LOG_EVERY = 2000, 128, 3e-3, 0, 50
RESTARTS, ASCENT_STEPS, ASCENT_LR = 32, 200, 0.02  # the adversarial search
BOX = np.array([[-2.0, -1.5], [3.0, 2.0]], np.float32)  # lower, upper corner: around the moons


def make_moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Two interleaved half circles with Gaussian noise: points (n, 2), labels (n,) in {0, 1}."""
  y = rng.integers(0, 2, n)
  t = rng.uniform(0, np.pi, n)
  upper = np.stack([np.cos(t), np.sin(t)], 1)
  lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
  x = np.where(y[:, None] == 0, upper, lower) + NOISE * rng.normal(size=(n, 2))
  return x.astype(np.float32), y.astype(np.float32)


class MLP(nn.Module):
  features: tuple[int, ...] = FEATURES
  dense: type[nn.Module] = nn.Dense  # the layer class: plain or spectral-normed

  @nn.compact
  def __call__(self, x):  # (batch, 2) points -> (batch, 1) logits
    for width in self.features[:-1]:
      x = jnp.tanh(
        self.dense(width)(x)
      )  # tanh: 1-Lipschitz and smooth (its gradient can be ascended)
    return self.dense(self.features[-1])(x)


def train(model: MLP, data, steps: int, label: str) -> dict:
  """Trains one model; returns its variables ({'params'} and, if normed, {'spectral'})."""
  x_train, y_train = data
  variables = jax.jit(model.init)(jax.random.key(SEED), x_train[:BATCH])
  params = variables.pop("params")
  state = variables  # what is not trained: {'spectral': ...}, or {} for the plain model
  tx = optax.adam(LR)
  opt_state = tx.init(params)

  def loss_fn(params, state, x, y):
    # Training mode: one power iteration per call; the new state comes back.
    logits, state = model.apply({"params": params, **state}, x, mutable=["spectral"])
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], y).mean(), state

  @jax.jit
  def train_step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  rng = np.random.default_rng(SEED)  # the same batches for both models
  losses = []
  bar = tqdm(range(1, steps + 1), desc=label)
  for step in bar:
    idx = rng.choice(len(x_train), BATCH, replace=False)
    params, state, opt_state, loss = train_step(
      params, state, opt_state, x_train[idx], y_train[idx]
    )
    losses.append(loss)
    if step % LOG_EVERY == 0 or step == steps:
      bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses))):.4f}")
      losses = []
  return {"params": params, **state}


def make_probes(model: MLP):
  """Jitted functions of the eval-mode model (no mutable collection: the state stays)."""

  def f(variables, x):  # one point (2,) -> its logit ()
    return model.apply(variables, x[None])[0, 0]

  def grad_sq(variables, x):  # ||df/dx||^2 at one point
    g = jax.grad(f, argnums=1)(variables, x)
    return jnp.sum(g * g)

  @jax.jit
  def logits(variables, x):  # (n, 2) -> (n,)
    return model.apply(variables, x)[:, 0]

  @jax.jit
  def grad_norms(variables, x):  # (n, 2) -> (n,)
    return jnp.sqrt(jax.vmap(grad_sq, (None, 0))(variables, x))

  @jax.jit
  def ascend(variables, x0):
    """Projected gradient ascent on ||df/dx||^2 from each start (n, 2); the best seen."""
    lo, hi = jnp.asarray(BOX[0]), jnp.asarray(BOX[1])

    def step(carry, _):
      x, best, best_x = carry
      value, g = jax.vmap(jax.value_and_grad(grad_sq, argnums=1), (None, 0))(variables, x)
      better = value > best
      best, best_x = jnp.where(better, value, best), jnp.where(better[:, None], x, best_x)
      # A fixed-length step along the gradient (its scale varies by orders of
      # magnitude between the models), then back into the box.
      g = g / (jnp.linalg.norm(g, axis=1, keepdims=True) + 1e-12)
      return (jnp.clip(x + ASCENT_LR * g, lo, hi), best, best_x), None

    start = (x0, jnp.full(x0.shape[:1], -1.0), x0)
    (x, best, best_x), _ = jax.lax.scan(step, start, None, length=ASCENT_STEPS)
    last = jax.vmap(grad_sq, (None, 0))(variables, x)  # the final point counts too
    best_x = jnp.where((last > best)[:, None], x, best_x)
    return jnp.sqrt(jnp.maximum(best, last)), best_x

  return logits, grad_norms, ascend


def kernel_norm_product(params) -> float:
  """The product of the kernels' largest singular values (SVD): a bound for the plain MLP."""
  flat = traverse_util.flatten_dict(params, sep="/")
  norms = [
    np.linalg.svd(np.asarray(w), compute_uv=False)[0] for k, w in flat.items() if "kernel" in k
  ]
  return float(np.prod(norms))


def evaluate(model: MLP, variables, bound: float, data, key) -> dict:
  """Accuracy, certified accuracy and the empirical Lipschitz constants of one trained model."""
  (x_train, _), (x_test, y_test) = data
  logits, grad_norms, ascend = make_probes(model)
  z = np.asarray(logits(variables, x_test))
  correct = (z > 0) == (y_test > 0.5)
  on_data = np.asarray(grad_norms(variables, np.concatenate([x_train, x_test])))
  # Restarts: the data points with the largest gradients, and random points in the box.
  worst = np.concatenate([x_train, x_test])[np.argsort(on_data)[-RESTARTS // 2 :]]
  rand = jax.random.uniform(key, (RESTARTS - len(worst), 2), minval=BOX[0], maxval=BOX[1])
  found, found_x = ascend(variables, jnp.concatenate([jnp.asarray(worst), rand]))
  found = np.asarray(found)
  return {
    "accuracy": float(correct.mean()),
    "certified accuracy": float((correct & (np.abs(z) > bound * RADIUS)).mean()),
    "on data": float(on_data.max()),
    "adversarial": float(found.max()),
    "adversarial x": np.asarray(found_x)[found.argmax()],
    "logits": logits,
  }


def plot(path: str, data, runs: dict[str, dict]) -> None:
  fig = Figure(figsize=(13, 3.8), layout="constrained")
  axes = fig.subplots(1, 3, width_ratios=(1, 1, 0.9))
  xs, ys = np.meshgrid(
    np.linspace(BOX[0, 0], BOX[1, 0], 200), np.linspace(BOX[0, 1], BOX[1, 1], 140)
  )
  grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
  x_test, y_test = data[1]
  for ax, (label, run) in zip(axes[:2], runs.items()):
    z = np.asarray(run["logits"](run["variables"], grid)).reshape(xs.shape)
    # The same colour scale for both: the plain model's logit is the steeper one.
    im = ax.contourf(xs, ys, z, levels=np.linspace(-10, 10, 21), cmap="RdBu_r", extend="both")
    ax.contour(xs, ys, z, levels=[0.0], colors="k", linewidths=1.5)
    ax.scatter(*x_test[:300].T, c=y_test[:300], cmap="bwr", s=7, edgecolors="w", linewidths=0.3)
    ax.plot(*run["adversarial x"], "k*", ms=12, label="largest ||df/dx|| found")
    ax.set_title(f"{label}: accuracy {run['accuracy']:.3f}", fontsize=10)
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize=8)
  fig.colorbar(im, ax=axes[:2], label="logit f(x)", shrink=0.8)
  ax = axes[2]
  names = ("on data", "adversarial", "bound")
  width = 0.38
  for j, (label, run) in enumerate(runs.items()):
    values = [run[k] for k in names]
    pos = np.arange(len(names)) + (j - 0.5) * width
    ax.bar(pos, values, width, label=label, color=("tab:blue", "tab:red")[j])
    for p, v in zip(pos, values):
      ax.text(p, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(np.arange(len(names)), ["max ||df/dx||\non data", "max ||df/dx||\nadversarial",
                                        "upper bound\n(certified / SVD)"])  # fmt: skip
  ax.set_yscale("log")
  ax.set_yticks([5, 10, 20, 50, 100, 200, 500, 1000])
  ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(NullFormatter())
  ax.set_ylabel("Lipschitz constant (log)")
  ax.set_title("Lipschitz constant of f: empirical ≤ bound", fontsize=10)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=80)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of each model")
  parser.add_argument("--out", default="out/lipschitz_classifier", help="directory for the PNG")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  rng = np.random.default_rng(SEED)
  data = (make_moons(rng, N_TRAIN), make_moons(rng, N_TEST))
  models = {  # the only difference: the layer class
    "spectral norm (clip)": MLP(
      dense=flaxnorm.spectral_norm(nn.Dense, operator=True, mode="clip", target=TARGET)
    ),
    "plain": MLP(),
  }
  runs, failed = {}, False
  for label, model in models.items():
    variables = train(model, data[0], args.steps, label)
    if "spectral" in variables:
      lip = flaxnorm.lipschitz_bound(variables, model=model, inputs=(data[0][0][:1],))
      assert lip.certified is not None  # every layer is a Dense: each one is certified
      bound, kind = (
        lip.certified,
        f"certified bound {lip.certified:.4g} (estimate {float(lip.estimate):.4g})",
      )
    else:
      bound = kernel_norm_product(variables["params"])
      kind = f"no constraint: product of the kernels' norms {bound:.4g}"
    run = evaluate(model, variables, bound, data, jax.random.key(SEED + 1))
    runs[label] = {**run, "variables": variables, "bound": bound}
    print(
      f"{label:>20}: test accuracy {run['accuracy']:.3f}, certified at radius {RADIUS} "
      f"{run['certified accuracy']:.3f}; max ||df/dx|| on data {run['on data']:.4g}, "
      f"adversarial {run['adversarial']:.4g}; {kind}"
    )
    # A search finds a lower bound of the Lipschitz constant: never above an upper one.
    failed |= run["adversarial"] > bound * (1 + 1e-4) or run["on data"] > bound * (1 + 1e-4)

  plot(os.path.join(args.out, "lipschitz_classifier.png"), data, runs)
  print(f"wrote lipschitz_classifier.png to {args.out}  [{time.perf_counter() - start:.1f} s]")
  if failed:
    print("FAILED: an input gradient is larger than the Lipschitz bound", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
