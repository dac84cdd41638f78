"""How long ``flaxnorm.interop.load_torch_state_dict`` takes, the first time, in a fresh process.

Run by hand (not a test)::

  python benchmarks/bench_torch_load.py          # ~1 minute on 2 CPU cores
  python benchmarks/bench_torch_load.py --runs 5

Two models, each loaded in a new Python process (so nothing is cached or
compiled yet; imports are done before the clock starts):

* ``sn19``: a 19-layer spectral-normed discriminator (six blocks of three
  Conv2d, 128 channels, and a Linear head; PyTorch's legacy spectral-norm keys).
* ``hifigan_v1``: the full-size HiFi-GAN V1 generator (upsample rates
  8, 8, 2, 2, initial channel 512, ResBlock1 with kernels 3, 7, 11; about 14 M
  params), weight-normed with PyTorch's legacy keys.

The state dicts are numpy arrays of PyTorch's shapes (torch is not needed).
Each process times one first load: from ready variable shapes (the issue's
measurement; ``jax.eval_shape`` runs before the clock starts) or from the Flax
model (``variables=model, inputs=...``: its shape-only trace included). Wall
and CPU times are medians over ``--runs`` processes (CPU time is the steadier
one on a shared machine). Nothing is asserted; the issue's targets are
printed beside the numbers (sn19 first load <= 0.5 s, hifigan_v1 <= 2 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

TARGETS = {"sn19": 0.5, "hifigan_v1": 2.0}


def _sn19():
  import flax.linen as nn
  import numpy as np

  import flaxnorm

  ch, rng = 128, np.random.default_rng(0)

  def unit(n):
    x = rng.normal(size=n).astype(np.float32)
    return x / np.linalg.norm(x)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      for c in ("c1", "c2", "c3"):
        x = nn.relu(flaxnorm.spectral_norm(nn.Conv(ch, (3, 3), padding=1, name=c))(x))
      return x

  class Disc(nn.Module):
    def setup(self):
      self.blocks = [Block() for _ in range(6)]  # "blocks_0/c1", ...: PyTorch's "blocks.0.c1"
      self.head = flaxnorm.spectral_norm(nn.Dense(1))

    def __call__(self, x):
      for block in self.blocks:
        x = block(x)
      return self.head(x.mean(axis=(1, 2)))

  sd = {}
  for b in range(6):
    for i, c in enumerate(("c1", "c2", "c3")):
      cin = 3 if b == i == 0 else ch
      w = rng.normal(size=(ch, cin, 3, 3)).astype(np.float32) * 0.05
      p = f"blocks.{b}.{c}."
      sd |= {p + "weight_orig": w, p + "weight_u": unit(ch), p + "weight_v": unit(cin * 9)}
      sd[p + "bias"] = np.zeros(ch, np.float32)
  sd |= {"head.weight_orig": rng.normal(size=(1, ch)).astype(np.float32), "head.bias": np.zeros(1)}
  sd |= {"head.weight_u": unit(1), "head.weight_v": unit(ch)}
  # Square convs fit both Conv and ConvTranspose layouts: without a model, kinds names them.
  return Disc(), np.zeros((1, 32, 32, 3), np.float32), sd, {"": "conv2d", "head": "linear"}


def _hifigan_v1():
  import flax.linen as nn
  import numpy as np

  import flaxnorm
  from flaxnorm import interop

  rates, up_k, ch0, rb_k, dil = (8, 8, 2, 2), (16, 16, 4, 4), 512, (3, 7, 11), (1, 3, 5)
  rng = np.random.default_rng(0)

  def pad(k, d=1):
    return (k * d - d) // 2

  def wn_conv(c, k, d=1):
    return flaxnorm.weight_norm(nn.Conv(c, (k,), kernel_dilation=(d,), padding=pad(k, d)))

  class Block(nn.Module):
    ch: int
    k: int

    def setup(self):
      self.convs1 = [wn_conv(self.ch, self.k, d) for d in dil]
      self.convs2 = [wn_conv(self.ch, self.k) for _ in dil]

    def __call__(self, x):
      for c1, c2 in zip(self.convs1, self.convs2):
        x = x + c2(nn.leaky_relu(c1(nn.leaky_relu(x, 0.1)), 0.1))
      return x

  class Generator(nn.Module):
    def setup(self):
      self.conv_pre = wn_conv(ch0, 7)
      ups, blocks = [], []
      for i, (u, k) in enumerate(zip(rates, up_k)):
        conv = nn.ConvTranspose(
          ch0 // 2 ** (i + 1), (k,), (u,), padding=interop.conv_transpose_padding(k, (k - u) // 2)
        )
        ups.append(flaxnorm.weight_norm(conv, axis=-2))
        blocks += [Block(ch0 // 2 ** (i + 1), k) for k in rb_k]
      self.ups, self.resblocks = ups, blocks
      self.conv_post = wn_conv(1, 7)

    def __call__(self, x):
      x = self.conv_pre(x)
      for i, up in enumerate(self.ups):
        x = up(nn.leaky_relu(x, 0.1))
        x = sum(self.resblocks[i * len(rb_k) + j](x) for j in range(len(rb_k))) / len(rb_k)
      return self.conv_post(nn.leaky_relu(x))

  def wn(prefix, shape, g_shape):
    w = rng.normal(size=shape).astype(np.float32)
    return {
      prefix + "weight_g": np.ones(g_shape, np.float32),
      prefix + "weight_v": w,
      prefix + "bias": np.zeros(shape[1] if prefix.startswith("ups") else shape[0], np.float32),
    }

  sd = wn("conv_pre.", (ch0, 80, 7), (ch0, 1, 1))
  for i, k in enumerate(up_k):
    cin, cout = ch0 // 2**i, ch0 // 2 ** (i + 1)
    sd |= wn(f"ups.{i}.", (cin, cout, k), (cin, 1, 1))
    for j, rk in enumerate(rb_k):
      for n in ("convs1", "convs2"):
        for d in range(3):
          sd |= wn(f"resblocks.{i * 3 + j}.{n}.{d}.", (cout, cout, rk), (cout, 1, 1))
  sd |= wn("conv_post.", (1, ch0 // 16, 7), (1, 1, 1))
  return (
    Generator(),
    np.zeros((1, 32, 80), np.float32),
    sd,
    {"": "conv1d", **{f"ups.{i}": "conv_transpose1d" for i in range(4)}},  # square convs too
  )


def child(case: str, mode: str) -> None:
  """One fresh process: build, then time one load (``mode``: from the model or its shapes)."""
  import jax
  import numpy as np

  from flaxnorm import interop

  model, x, sd, kinds = {"sn19": _sn19, "hifigan_v1": _hifigan_v1}[case]()
  n_params = sum(int(np.prod(a.shape)) for a in sd.values())
  if mode == "shapes":  # traced before the clock starts; the ConvTransposes then need kinds=
    target, kw = jax.eval_shape(model.init, jax.random.key(0), x), {"kinds": kinds}
  else:
    target, kw = model, {"inputs": x}
  t0, c0 = time.perf_counter(), time.process_time()
  res = interop.load_torch_state_dict(sd, target, **kw)
  jax.block_until_ready(res.variables)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  print(json.dumps({"layers": len(res.layers), "params": n_params, "wall": wall, "cpu": cpu}))


def _run(case: str, mode: str, runs: int) -> tuple[dict, float, float]:
  out = []
  for _ in range(runs):
    proc = subprocess.run(
      [sys.executable, __file__, "--child", f"{case}:{mode}"],
      capture_output=True,
      text=True,
      check=True,
    )
    out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  wall = statistics.median(r["wall"] for r in out)
  return out[0], wall, statistics.median(r["cpu"] for r in out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3, help="fresh processes per measurement")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child.split(":"))
    return
  print(
    "| model | layers | params | from variables: wall / CPU (s) "
    "| from the model (trace included): wall / CPU (s) | target (first load) |"
  )
  print("|---|---|---|---|---|---|")
  for case, target in TARGETS.items():
    info, wall_v, cpu_v = _run(case, "shapes", args.runs)
    _, wall_m, cpu_m = _run(case, "model", args.runs)
    verdict = "PASS" if wall_v <= target else "MISS"
    print(
      f"| {case} | {info['layers']} | {info['params'] / 1e6:.1f} M | {wall_v:.2f} / {cpu_v:.2f} "
      f"| {wall_m:.2f} / {cpu_m:.2f} | <= {target} s: {verdict} |"
    )


if __name__ == "__main__":
  main()
