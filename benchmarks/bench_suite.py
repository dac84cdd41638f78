"""One benchmark suite: flaxnorm against every JAX peer, on the models people normalize.

Run by hand (not a test)::

  python benchmarks/bench_suite.py --quick        # smoke run, ~2 minutes on 2 CPU cores
  python benchmarks/bench_suite.py                # full run (./dev.sh bench)
  python benchmarks/bench_suite.py --gpu          # on a GPU: absolute times (benchmarks/run_gpu.sh)
  python benchmarks/bench_suite.py --only disc,gen --no-torch --no-bf16

One process, one table. Models (``_suite_common``): the MLP 512-1024-1024-1024-10
at batch 128 and 1024, the conv discriminator (batch 64), the HiFi-GAN-shaped
generator (batch 4, 8192 samples). Peers, each where installed: plain,
flaxnorm (Linen and NNX), ``flax.linen.WeightNorm``/``SpectralNorm``,
``flax.nnx.WeightNorm``/``SpectralNorm``, equinox ``WeightNorm``/``SpectralNorm``,
Haiku ``SNParamsTree``; PyTorch CPU in its own process (``_suite_torch.py``).

Every step is an Adam train step on an MSE loss, compiled ahead of time
(``jit(...).lower(...).compile()``, which also gives the compile time and the
memory analysis). Within a model, each round runs a few steps of every
variant in a shuffled order and keeps each one's fastest step
(``_suite_stats``); a variant's ratio is the median over rounds of its time
over its own face's plain step in the same round, with a 95% bootstrap
interval, and flaxnorm is compared with each peer the same way. Also: compile time of the spectral-norm step
against n = 1, 2, 50, 1000; sigma accuracy against an SVD after 0, 1, 10 and 100
training applies; peak memory; the ratios again in bfloat16. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite_report as report
import _suite_stats as stats
import jax
import jax.numpy as jnp
import numpy as np
from _suite_common import Run, flattened
from _suite_flax import FORCED, build_linen, build_nnx
from _suite_floor import FLOOR, FLOOR_BASE, build_floor
from _suite_peers import EQX_VARIANTS, HAIKU_VARIANTS, HAVE_EQX, HAVE_HAIKU, build_eqx, build_haiku
from _suite_shapes import MODELS

SN_VARIANTS = (  # (face, variant, unrolls its power iteration in Python)
  ("Linen", "flaxnorm SN", False),
  ("Linen", "flax.linen SN", True),
  ("NNX", "flaxnorm SN", False),
  ("NNX", "flax.nnx SN", True),
  ("equinox", "equinox SN", True),
  ("Haiku", "haiku SNParamsTree", True),
)
BUILDERS = {"Linen": build_linen, "NNX": build_nnx, "equinox": build_eqx, "Haiku": build_haiku}


def variants(model: str, forced: bool, floor: bool) -> list[tuple[str, str]]:
  """(face, variant) of one model, peers that are not installed left out."""
  linen = ["plain", "flaxnorm WN", "flaxnorm SN", "flax.linen WN", "flax.linen SN"]
  if model == "disc":
    linen.append("flaxnorm SN operator")
  if forced:
    linen += [f"flaxnorm {k}{s}" for k in ("WN", "SN") for s in FORCED]
  out = [("Linen", v) for v in linen]
  nnx = ["plain", "flaxnorm WN", "flaxnorm SN", "flax.nnx WN", "flax.nnx SN"]
  if model == "disc":
    nnx.append("flaxnorm SN operator")
  out += [("NNX", v) for v in nnx]
  out += [("equinox", v) for v in EQX_VARIANTS if HAVE_EQX]
  out += [("Haiku", v) for v in HAIKU_VARIANTS if HAVE_HAIKU]
  if floor and model == "mlp128":
    out += [("floor", v) for v in FLOOR]
  return out


def build(face: str, variant: str, model: str, dtype, n_power=1, lr=None) -> Run:
  """One variant's run, over a flat list of its state's leaves (see ``flattened``).

  The model is initialized on the host and its state and batch are then moved to
  the default device: on a GPU, an eager init compiles one kernel per op and
  shape there (seconds per variant of the generator, again after every
  ``jax.clear_caches()``). On a CPU both steps are no-ops.
  """
  kwargs = {} if lr is None else {"lr": lr}
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    if face == "floor":
      run = flattened(build_floor(variant, model, dtype))
    else:
      run = flattened(BUILDERS[face](variant, model, dtype, n_power, **kwargs))
  state, x, y = jax.device_put((run.state, run.x, run.y), jax.devices()[0])
  return dataclasses.replace(run, state=state, x=x, y=y)


def compile_run(run: Run):
  """(compiled step, lower + compile seconds)."""
  t = time.perf_counter()
  jitted = jax.jit(run.step, donate_argnums=(0,) if run.donate else ())
  if run.trace is not None:
    with run.trace():
      lowered = jitted.lower(run.state, run.x, run.y)
  else:
    lowered = jitted.lower(run.state, run.x, run.y)
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t


def peak_bytes(compiled) -> int | None:
  """Peak memory of a compiled step: arguments + outputs + temporaries, less aliased buffers."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def time_model(model: str, dtype, cfg, forced: bool, floor: bool, notes: list) -> dict:
  """Compiles every variant of one model, then times them in interleaved rounds."""
  runs = {}
  keep = set(cfg["keep"])
  faces = {_group_of(k) for k in keep}  # --variants: their rows and their faces' plain steps
  for face, variant in variants(model, forced, floor):
    key = f"{face}: {variant}"
    if keep and key not in keep and not (variant == "plain" and face in faces):
      continue
    try:
      run = build(face, variant, model, dtype)
      compiled, seconds = compile_run(run)
      state = run.state
      for _ in range(cfg["warmup"]):
        state, loss = compiled(state, run.x, run.y)
      jax.block_until_ready(loss)
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f"loss {float(loss)}")
    except Exception as e:  # a peer that cannot run this model is a note, not a crash
      notes.append(
        f"{model} {jnp.dtype(dtype).name}: {key} skipped ({type(e).__name__}: {e})"[:300]
      )
      continue
    runs[key] = dict(
      compiled=compiled,
      run=run,
      state=state,
      compile_s=seconds,
      peak=peak_bytes(compiled),
      normalized_bytes=run.normalized_bytes,
    )
  times = stats.interleaved(
    {key: functools.partial(_one_step, entry) for key, entry in runs.items()},
    n=cfg["steps"][MODELS[model][0]],
    rounds=cfg["rounds"],
    min_rounds=cfg["min_rounds"],
    budget_s=cfg["model_budget_s"],
    group=_group_of,
  )
  out = {}
  for key, e in runs.items():
    base = times.get(_base_of(key))
    ratio = stats.paired(times[key], base) if base else None
    out[key] = dict(
      ms=statistics.median(times[key]),
      ratio=None if ratio is None else ratio.median,
      ci=None if ratio is None else [ratio.lo, ratio.hi],
      times=times[key],
      rounds=len(times[key]),
      compile_s=e["compile_s"],
      peak=e["peak"],
      normalized_bytes=e["normalized_bytes"],
    )
  return out


def _one_step(entry: dict) -> None:
  """One train step of a compiled run, blocking; the run's state moves on."""
  state, loss = entry["compiled"](entry["state"], entry["run"].x, entry["run"].y)
  jax.block_until_ready((state, loss))
  entry["state"] = state


def _group_of(key: str) -> str:
  """The face whose plain step ``key`` is divided by (the floor's rows: Linen's)."""
  face = key.split(": ", 1)[0]
  return "Linen" if face == "floor" else face


def _base_of(key: str) -> str:
  face, variant = key.split(": ", 1)
  if face == "floor":
    return f"floor: {FLOOR_BASE[variant]}" if variant in FLOOR_BASE else "Linen: plain"
  return f"{face}: plain"


def _fresh_compile(run: Run) -> float:
  """Lower + compile seconds with JAX's in-memory caches cleared (a repeat would hit them)."""
  jax.clear_caches()
  return compile_run(run)[1]


def compile_sweep(ns, reps, notes) -> dict:
  """Lower + compile seconds of each spectral-norm MLP step against n (unrolled peers: n <= 50)."""
  out = {}
  for face, variant, unrolled in SN_VARIANTS:
    if (face, variant) not in variants("mlp128", False, False):
      continue
    for n in ns:
      if unrolled and n > 50:
        continue
      try:
        run = build(face, variant, "mlp128", jnp.float32, n_power=n)
        out[f"{face}: {variant}", n] = statistics.median(_fresh_compile(run) for _ in range(reps))
      except Exception as e:
        notes.append(f"compile {face}: {variant} n={n} skipped ({type(e).__name__}: {e})"[:300])
  return out


def sigma_accuracy(applies=(0, 1, 10, 100)) -> dict:
  """max over layers of |sigma_hat / sigma_svd - 1| after k training applies (lr 0: weights fixed)."""
  out = {}
  for face, variant, _ in SN_VARIANTS:
    if (face, variant) not in variants("mlp128", False, False):
      continue
    run = build(face, variant, "mlp128", jnp.float32, lr=0.0)
    compiled, _ = compile_run(run)
    state, done = run.state, 0
    for k in applies:
      for _ in range(k - done):
        state, _ = compiled(state, run.x, run.y)
      done = k
      errs = [
        abs(float(s) / np.linalg.svd(w, compute_uv=False)[0] - 1) for s, w in run.sigmas(state)
      ]
      out[f"{face}: {variant}", k] = max(errs)
  return out


def run_torch(quick: bool, notes: list) -> dict:
  """The PyTorch CPU rows, from their own process (JSON on stdout)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_suite_torch.py")
  try:
    proc = subprocess.run(
      [sys.executable, script, *(["--quick"] if quick else [])],
      capture_output=True,
      text=True,
      timeout=1200,
      check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])
  except Exception as e:
    notes.append(f"PyTorch skipped ({type(e).__name__}: {str(e)[:200]})")
    return {}


def versions() -> str:
  names = ("jax", "jaxlib", "flax", "optax", "equinox", "dm-haiku", "torch", "numpy")
  found = []
  for name in names:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{name} not installed")
  return ", ".join(found)


def machine() -> str:
  cpu = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  dev = jax.devices()[0]
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (
    f"{cpu or platform.machine()}, {os.cpu_count()} CPUs (load {load:.1f} at start), "
    f"device {dev.platform} ({dev.device_kind})"
  )


def _time(res: dict, model: str, dtype, cfg: dict, notes: list, path: str | None) -> None:
  """Times one model in one dtype into res["steps"] (forced sides and floor rows in float32)."""
  name = jnp.dtype(dtype).name
  print(f"train step: {model} {name} ...", flush=True)
  fp32 = name == "float32"
  res["steps"][f"{model} {name}"] = time_model(
    model, dtype, cfg, forced=fp32 and model != "mlp1024", floor=fp32, notes=notes
  )
  _save(res, path)


def _save(res: dict, path: str | None) -> None:
  """Writes the results so far (a crash later keeps them: --from-json prints their tables)."""
  if path:
    with open(path, "w") as f:
      json.dump(res, f, indent=1)


def _merged(paths: list[str]) -> dict:
  """Saved results merged in order (e.g. a split GPU run's parts); header from the first."""
  res: dict = {"steps": {}, "sigma": {}, "compile": {}, "torch": {}, "notes": [], "total_s": 0.0}
  for path in paths:
    with open(path) as f:
      part = json.load(f)
    for key in ("steps", "sigma", "compile", "torch"):
      res[key].update(part.pop(key, {}))
    res["notes"] += part.pop("notes", [])
    res["total_s"] += part.pop("total_s", float("nan"))  # a capped part has none
    res = {**part, **res}
  if res["total_s"] != res["total_s"]:
    del res["total_s"]  # the report then says the run was cut short
  return res


def _extras(res: dict, args, notes: list) -> None:
  """sigma against the SVD and compile time against n, into ``res``."""
  print("sigma accuracy ...", flush=True)
  try:
    res["sigma"] = {f"{k} | {n}": e for (k, n), e in sigma_accuracy().items()}
  except Exception as e:
    notes.append(f"sigma accuracy failed ({type(e).__name__}: {e})"[:300])
  _save(res, args.json)
  print("compile time against n ...", flush=True)
  ns = (1, 2, 50, 1000)
  sweep = compile_sweep(ns, 1 if args.quick else args.compile_reps, notes)
  res["compile"] = {f"{k} | {n}": s for (k, n), s in sweep.items()}
  _save(res, args.json)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
  parser.add_argument(
    "--gpu", action="store_true", help="GPU table: absolute times, no PyTorch CPU"
  )
  parser.add_argument("--only", default=",".join(MODELS), help="comma-separated models")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--no-bf16", action="store_true")
  parser.add_argument("--no-f32", action="store_true", help="only the bfloat16 train steps")
  parser.add_argument(
    "--bf16-only", help="comma-separated models for the bfloat16 ratios (default all)"
  )
  parser.add_argument("--rounds", type=int, default=40, help="at most this many rounds a model")
  parser.add_argument("--min-rounds", type=int, default=15, help="at least this many rounds")
  parser.add_argument(
    "--model-budget", type=float, default=90, help="seconds after which no new round starts"
  )
  parser.add_argument(
    "--variants",
    help='comma-separated "Face: variant" rows to time (e.g. "Linen: flaxnorm WN"); '
    "with the plain steps of their faces",
  )
  parser.add_argument("--steps", type=int, help="steps per variant per round (default 5 / 3)")
  parser.add_argument(
    "--steps-only", action="store_true", help="only the train steps: no sigma, compile, PyTorch"
  )
  parser.add_argument("--compile-reps", type=int, default=3, help="median of this many compiles")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--chart", help="write the PNG bar chart of the ratios here")
  parser.add_argument(
    "--from-json",
    help="only print the tables (and --chart) of a saved --json (comma-separated: merged)",
  )
  args = parser.parse_args()
  if args.from_json:
    res = _merged(args.from_json.split(","))
    print(report.markdown(res))
    if args.chart:
      report.chart(res, args.chart)
    return
  if args.gpu and jax.devices()[0].platform == "cpu":
    sys.exit("--gpu: no GPU backend (jax.devices() is CPU)")
  cfg = dict(
    warmup=1 if args.quick else 3,
    rounds=2 if args.quick else args.rounds,
    min_rounds=2 if args.quick else args.min_rounds,
    model_budget_s=5 if args.quick else args.model_budget,
    keep=[k.strip() for k in args.variants.split(",")] if args.variants else [],
    steps={
      "mlp": 2 if args.quick else 5,
      "disc": 1 if args.quick else 3,
      "gen": 1 if args.quick else 3,
    },
  )
  if args.gpu:
    cfg.update(steps={"mlp": 20, "disc": 10, "gen": 10})
  if args.steps:
    cfg.update(steps=dict.fromkeys(("mlp", "disc", "gen"), args.steps))
  models = [m for m in args.only.split(",") if m]
  notes: list[str] = []
  if not HAVE_EQX:
    notes.append("equinox not installed: its rows are skipped (pip install flaxnorm[bench])")
  if not HAVE_HAIKU:
    notes.append("dm-haiku not installed: its rows are skipped (pip install flaxnorm[bench])")
  res = dict(
    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    machine=machine(),
    versions=versions(),
    quick=args.quick,
    gpu=args.gpu,
    cfg={k: v for k, v in cfg.items()},
  )
  t0 = time.perf_counter()
  print(f"# {res['date']}; {res['machine']}\n# {res['versions']}", flush=True)
  res["steps"] = {}
  bf16_models = args.bf16_only.split(",") if args.bf16_only else models
  for model in [] if args.no_f32 else models:
    _time(res, model, jnp.float32, cfg, notes, args.json)
  if not args.steps_only:
    _extras(res, args, notes)
  if not (args.no_torch or args.gpu or args.steps_only):
    print("PyTorch (own process) ...", flush=True)
    res["torch"] = run_torch(args.quick, notes)
  for model in [] if args.no_bf16 else [m for m in models if m in bf16_models]:
    _time(res, model, jnp.bfloat16, cfg, notes, args.json)
  res["notes"] = notes
  res["total_s"] = time.perf_counter() - t0
  _save(res, args.json)
  print()
  print(report.markdown(res))
  if args.chart:
    report.chart(res, args.chart)


if __name__ == "__main__":
  main()
