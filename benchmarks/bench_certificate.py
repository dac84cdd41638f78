"""Time of the certified spectral-norm bound (Gram iteration) for a Dense and a Conv kernel.

Run by hand (not a test)::

  python benchmarks/bench_certificate.py              # ~2-4 minutes on 2 CPU cores
  python benchmarks/bench_certificate.py --quick      # smoke run: smaller shapes, 1 repeat
  python benchmarks/bench_certificate.py --fft-svd    # also the exact circular norm by SVD
  python benchmarks/bench_certificate.py --blas-threads 1   # needs threadpoolctl

(a) ``matrix_norm_bound`` of a 1024 x 1024 Gaussian matrix, next to its SVD
sigma_1 and flaxnorm's power-iteration sigma (200 steps, float32).

(b) ``conv_norm_bound`` of a 3 x 3 x 256 x 256 Gaussian conv kernel (He scale)
on 32 x 32 inputs, SAME padding (the certificate for ``flax.linen.Conv``) and
CIRCULAR, next to power iteration on the layer itself (``x -> conv^T conv x``
through ``jax.vjp``, 100 steps, float32: a *lower* bound of the true norm). With
``--fft-svd``, also the exact circular norm: the max of sigma_1 over the 32 x 17
FFT blocks, by numpy's SVD.

Times are medians over ``--repeats`` runs (default 3) of the whole call,
argument checks included; numpy float64, nothing jitted. The certificate is
computed rarely (after training, per checkpoint), not in the train step. On a
loaded machine OpenBLAS's spinning threads can slow the many per-block calls
several times over: ``--blas-threads 1`` (or ``OPENBLAS_NUM_THREADS=1``) then
runs faster; the header prints the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flaxnorm
from flaxnorm._certify import DEFAULT_GRAM_STEPS, conv_norm_bound, matrix_norm_bound


def _median_time(fn, repeats: int) -> tuple[float, float]:
  times, value = [], 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), value


def _conv_power_iteration(kernel: np.ndarray, spatial: tuple[int, ...], padding: str, steps: int):
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:-2], padding=padding, use_bias=False)
  params = {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}
  apply = lambda x: conv.apply(params, x)

  @jax.jit
  def run(x):
    def step(_, x):
      y, vjp = jax.vjp(apply, x)
      (z,) = vjp(y)
      return z / jnp.linalg.norm(z)

    x = jax.lax.fori_loop(0, steps, step, x / jnp.linalg.norm(x))
    return jnp.linalg.norm(apply(x))

  x = jax.random.normal(jax.random.key(0), (1, *spatial, kernel.shape[-2]))
  return float(run(x))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smaller shapes, 1 repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--fft-svd", action="store_true", help="exact circular norm by SVD")
  parser.add_argument("--blas-threads", type=int, default=None, help="limit BLAS threads")
  args = parser.parse_args()
  if args.blas_threads is not None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.blas_threads)
  repeats = 1 if args.quick else args.repeats
  n, channels, spatial = (256, 64, (16, 16)) if args.quick else (1024, 256, (32, 32))

  print(
    f"# bench_certificate  {datetime.date.today()}  {platform.machine()}, "
    f"{os.cpu_count()} CPU cores, numpy {np.__version__}, jax {jax.__version__}, "
    f"n_steps={DEFAULT_GRAM_STEPS}, repeats={repeats}, blas_threads={args.blas_threads}, "
    f"load average {os.getloadavg()[0]:.1f}"
  )
  rows = []

  w = np.random.default_rng(0).standard_normal((n, n))
  t_bound, bound = _median_time(lambda: matrix_norm_bound(w), repeats)
  t_svd, svd = _median_time(lambda: float(np.linalg.svd(w, compute_uv=False)[0]), 1)
  u = jax.random.normal(jax.random.key(0), (n,))
  _, _, pi = flaxnorm.power_iteration(jnp.asarray(w, jnp.float32), u, n_steps=200)
  rows.append((f"Dense {n}x{n}", t_bound, bound, "SVD", svd, t_svd))
  rows.append((f"Dense {n}x{n}", t_bound, bound, "power iteration (200)", float(pi), None))

  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((3, 3, channels, channels)) * np.sqrt(2.0 / (9 * channels))
  name = f"Conv 3x3x{channels}x{channels} on {spatial[0]}x{spatial[1]}"
  for padding in ("SAME", "CIRCULAR"):
    t_bound, bound = _median_time(
      lambda p=padding: conv_norm_bound(kernel, spatial, padding=p), repeats
    )
    pi = _conv_power_iteration(kernel, spatial, padding, 100)
    rows.append((f"{name} {padding}", t_bound, bound, "power iteration (100)", pi, None))
  if args.fft_svd:
    start = time.perf_counter()
    blocks = np.fft.fft2(kernel, axes=(0, 1), s=spatial)[:, : spatial[1] // 2 + 1]
    exact = float(np.linalg.svd(blocks.reshape(-1, channels, channels), compute_uv=False).max())
    t_exact = time.perf_counter() - start
    rows.append((f"{name} CIRCULAR", rows[-1][1], rows[-1][2], "FFT-block SVD", exact, t_exact))

  print()
  print("| case | certificate time (s) | bound | reference | reference value | bound / ref |")
  print("|---|---|---|---|---|---|")
  for case, t, b, ref_name, ref, t_ref in rows:
    timed = f" ({t_ref:.2f} s)" if t_ref is not None else ""
    print(f"| {case} | {t:.2f} | {b:.6f} | {ref_name}{timed} | {ref:.6f} | {b / ref:.5f} |")


if __name__ == "__main__":
  main()
