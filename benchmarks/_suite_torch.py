"""The suite's PyTorch CPU rows, in their own process (run by ``bench_suite.py``).

The same three models in PyTorch (channels first), plain, with
``torch.nn.utils.parametrizations.weight_norm`` and with
``parametrizations.spectral_norm`` (1 power iteration) on every layer; an Adam
step on an MSE loss; interleaved paired rounds as in the JAX suite (``_suite_stats``). Prints
progress on stderr and one JSON line on stdout:
``{model: {variant: {"ms": ..., "ratio": ..., "ci": [lo, hi]}}}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch
from torch import nn
from torch.nn.utils import parametrizations

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite_shapes as shapes
import _suite_stats as stats

VARIANTS = ("plain", "torch weight_norm", "torch spectral_norm")


class Gen(nn.Module):
  def __init__(self):
    super().__init__()
    self.pre = nn.Conv1d(shapes.GEN_IN, shapes.GEN_CHANNELS, 7, padding=3)
    ups, blocks, c_in = [], [], shapes.GEN_CHANNELS
    for ch, k, s in shapes.GEN_UPS:
      ups.append(nn.ConvTranspose1d(c_in, ch, k, stride=s, padding=(k - s) // 2))
      for d in shapes.GEN_DILATIONS:
        blocks += [nn.Conv1d(ch, ch, 3, dilation=d, padding=d), nn.Conv1d(ch, ch, 3, padding=1)]
      c_in = ch
    self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
    self.post = nn.Conv1d(c_in, 1, 7, padding=3)

  def forward(self, x):
    act = nn.functional.leaky_relu
    x, blocks = self.pre(x), iter(self.blocks)
    for up in self.ups:
      x = up(act(x, 0.1))
      for _ in shapes.GEN_DILATIONS:
        t = next(blocks)(act(x, 0.1))
        x = x + next(blocks)(act(t, 0.1))
    return torch.tanh(self.post(act(x, 0.1)))


def make(arch: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
  batch = {"mlp": None, "disc": 64, "gen": 4}[arch]
  if arch == "mlp":
    layers = []
    for a, b in itertools.pairwise(shapes.MLP_SIZES):
      layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), None, None
  if arch == "disc":
    layers, c_in = [], 3
    for c in shapes.DISC_CHANNELS:
      layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
      c_in = c
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 4 * c_in, 1))
    return net, torch.randn(batch, 3, 32, 32), torch.randn(batch, 1)
  return (
    Gen(),
    torch.randn(batch, shapes.GEN_IN, shapes.GEN_FRAMES),
    torch.randn(batch, 1, shapes.GEN_FRAMES * 256),
  )


def build(model: str, variant: str):
  torch.manual_seed(0)
  arch, batch = shapes.MODELS[model]
  net, x, y = make(arch)
  if arch == "mlp":
    x, y = torch.randn(batch, shapes.MLP_SIZES[0]), torch.randn(batch, shapes.MLP_SIZES[-1])
  for m in list(net.modules()):
    if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d):
      if variant == "torch weight_norm":
        parametrizations.weight_norm(m)
      elif variant == "torch spectral_norm":
        parametrizations.spectral_norm(m, n_power_iterations=1)
  opt = torch.optim.Adam(net.parameters(), lr=shapes.LR)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.mean((net(x) - y) ** 2)
    loss.backward()
    opt.step()
    return loss

  return step


def _row(times: list[float], plain: list[float]) -> dict:
  r = stats.paired(times, plain)
  return {"ms": statistics.median(times), "ratio": r.median, "ci": [r.lo, r.hi]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  rounds, min_rounds, budget = (2, 2, 5) if args.quick else (40, 15, 60)
  out = {}
  for model in shapes.MODELS:
    print(f"torch {model} ...", file=sys.stderr, flush=True)
    steps = {v: build(model, v) for v in VARIANTS}
    for step in steps.values():
      step()
    times = stats.interleaved(
      steps,
      n=3 if shapes.MODELS[model][0] == "mlp" else 2,
      rounds=rounds,
      min_rounds=min_rounds,
      budget_s=budget,
    )
    out[model] = {v: _row(t, times["plain"]) for v, t in times.items()}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
