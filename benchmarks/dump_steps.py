"""What a compiled train step is made of: its optimized HLO and memory, per variant.

Run by hand (not a test), on any backend::

  python benchmarks/dump_steps.py --model disc --out /tmp/steps
  python benchmarks/dump_steps.py --model gen --dtype bfloat16 \\
    --variants "Linen: plain,Linen: flaxnorm SN,Linen: flax.linen SN"

For each variant of the suite (``bench_suite.build``: same models, data, Adam step)
it compiles the step and writes ``OUT/<model>-<dtype>-<variant>.hlo.txt``
(``compiled.as_text()``) and one ``OUT/<model>-<dtype>.json`` with each step's
memory analysis (argument, output, temporary and aliased bytes; the suite's
peak), its count of fusions and of custom calls (on a GPU, with the
convolutions and GEMMs, about the kernels a step launches) and its normalized
weights' bytes. It prints a table of the same. With
``XLA_FLAGS=--xla_dump_to=DIR`` XLA also writes each step's buffer assignment and
memory-usage report there (``module_*.jit_<model>_<dtype>_<variant>.*``): which
buffers a step keeps, and for how long.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_suite
import jax
import jax.numpy as jnp
from _suite_common import Run

DEFAULT = (
  "Linen: plain,Linen: flaxnorm WN,Linen: flaxnorm SN,"
  "Linen: flaxnorm SN [kernel side],Linen: flaxnorm SN [output side],Linen: flax.linen SN"
)


def summary(compiled, normalized_bytes: int) -> dict:
  """Memory and op counts of one compiled step (``compiled.as_text()``)."""
  text = compiled.as_text()
  m = compiled.memory_analysis()
  out = {
    "fusions": len(re.findall(r" fusion\(", text)),
    "custom_calls": len(re.findall(r" custom-call\(", text)),
    "normalized_bytes": normalized_bytes,
    "peak": bench_suite.peak_bytes(compiled),
  }
  if m is not None:
    for field in ("argument", "output", "temp", "alias"):
      out[field] = getattr(m, f"{field}_size_in_bytes")
  return out


def _slug(key: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "_", key).strip("_")


def _named(run: Run, name: str) -> Run:
  """``run`` whose step compiles to an XLA module named after it (``jit_<name>``)."""
  step = functools.partial(run.step)
  step.__name__ = name.replace("-", "_").replace(".", "_")  # type: ignore[attr-defined]
  return dataclasses.replace(run, step=step)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="disc", choices=sorted(bench_suite.MODELS))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--variants", default=DEFAULT, help="comma-separated 'Face: variant' keys")
  p.add_argument("--out", default="benchmarks/step-dumps")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  dtype = jnp.dtype(args.dtype)
  name = f"{args.model}-{args.dtype}"
  res = {}
  for key in args.variants.split(","):
    face, variant = key.strip().split(": ", 1)
    run = bench_suite.build(face, variant, args.model, dtype)
    compiled, _ = bench_suite.compile_run(_named(run, f"{name}-{_slug(key)}"))
    with open(os.path.join(args.out, f"{name}-{_slug(key)}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
    res[key.strip()] = summary(compiled, run.normalized_bytes)
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump({"device": str(jax.devices()[0]), "results": res}, f, indent=1)
  print(f"{name} on {jax.devices()[0]}")
  print("| variant | fusions | custom calls | peak MB | temp MB |")
  print("|---|---:|---:|---:|---:|")
  for key, r in res.items():
    peak = "" if r["peak"] is None else f"{r['peak'] / 1e6:.1f}"
    temp = f"{r['temp'] / 1e6:.1f}" if "temp" in r else ""
    print(f"| {key} | {r['fusions']} | {r['custom_calls']} | {peak} | {temp} |")
  return res


if __name__ == "__main__":
  main()
