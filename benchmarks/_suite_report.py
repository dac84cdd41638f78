"""The suite's markdown tables and PNG chart, from its results dict (also its --json)."""

from __future__ import annotations

import _suite_stats as stats
from _suite_shapes import MODELS, TITLES

TARGET_CONV = 1.03  # flaxnorm WN and SN on the conv models, x plain


def _cell(entry: dict | None, gpu: bool) -> str:
  if entry is None:
    return ""
  if entry["ratio"] is None:
    return f"{entry['ms']:.2f} ms"
  ratio = f"{entry['ratio']:.2f}"
  ci = entry.get("ci")
  if ci and ci[0] != ci[1]:  # a plain step's ratio to itself has no interval
    ratio += f" ({ci[0]:.2f}–{ci[1]:.2f})"
  return f"{ratio}, {entry['ms']:.2f} ms" if gpu else ratio


def _keys(steps: dict, skip_floor=True) -> list[str]:
  seen = []
  for table in steps.values():
    for key in table:
      if key not in seen and not (skip_floor and key.startswith("floor:")):
        seen.append(key)
  return seen


def _is_peer(key: str) -> bool:
  return "flaxnorm" not in key and not key.endswith("plain") and not key.startswith("floor:")


def _peers(table: dict, kind: str) -> list[str]:
  """The peers' rows of one kind (WN or SN; Haiku's SNParamsTree counts as SN)."""
  return [
    k for k in table if _is_peer(k) and (f" {kind}" in k or (kind == "SN" and "SNParamsTree" in k))
  ]


def verdicts(table: dict, model: str) -> list[str]:
  """flaxnorm's targets on one model: <= 1.03 x plain on the conv models, below every peer.

  Each is decided from its 95% interval (``_suite_stats.verdict``): PASS when the
  whole interval meets the target, MISS when none of it does, else "within noise".
  Against a peer the measure is flaxnorm's overhead over the peer's, each over its
  own face's plain step, per round.
  """
  out = []
  for kind in ("WN", "SN"):
    peers = [p for p in _peers(table, kind) if table[p]["ratio"] is not None]
    for key in (f"Linen: flaxnorm {kind}", f"NNX: flaxnorm {kind}"):
      e = table.get(key)
      if e is None or e["ratio"] is None:
        continue
      checks = []
      if MODELS[model][0] != "mlp":
        r = stats.Ratio(e["ratio"], *e.get("ci") or (e["ratio"], e["ratio"]))
        checks.append(f"≤ {TARGET_CONV}: {stats.verdict(r, TARGET_CONV)}")
      for peer in peers:
        rel = _against(table, key, peer)
        checks.append(
          f"vs {peer.split(': ', 1)[1]} {rel.median:.2f} ({rel.lo:.2f}–{rel.hi:.2f}): "
          f"{stats.verdict(rel, 1.0).replace('PASS', 'below').replace('MISS', 'above')}"
        )
      out.append(f"{key} {e['ratio']:.2f}: " + "; ".join(checks))
  return out


def _against(table: dict, key: str, peer: str) -> stats.Ratio:
  """flaxnorm's ratio to its plain over the peer's ratio to its plain, paired per round."""
  mine, theirs = table[key], table[peer]
  if "times" not in mine:  # results saved before per-round times were kept
    value = mine["ratio"] / theirs["ratio"]
    return stats.Ratio(value, value, value)
  return stats.relative(
    mine["times"],
    table[_face_plain(key)]["times"],
    theirs["times"],
    table[_face_plain(peer)]["times"],
  )


def step_table(res: dict, dtype: str) -> list[str]:
  steps = {k.rsplit(" ", 1)[0]: t for k, t in res["steps"].items() if k.endswith(dtype)}
  if not steps:
    return []
  gpu = res["gpu"]
  models = list(steps)
  lines = [
    "| train step, ratio to the face's plain"
    + (" (ms/step)" if gpu else "")
    + " | "
    + " | ".join(models)
    + " |",
    "|---|" + "---:|" * len(models),
  ]
  for key in _keys(steps):
    lines.append(f"| {key} | " + " | ".join(_cell(steps[m].get(key), gpu) for m in models) + " |")
  plain = [
    f"{m} {steps[m]['Linen: plain']['ms']:.1f} ms" for m in models if "Linen: plain" in steps[m]
  ]
  lines.append("")
  lines.append("Linen plain step: " + ", ".join(plain) + ".")
  checks = [f"- {m}: {v}" for m in models for v in verdicts(steps[m], m)]
  return [*lines, "", *checks] if checks else lines


def floor_table(res: dict) -> list[str]:
  table = res["steps"].get("mlp128 float32", {})
  rows = [
    (k, e)
    for k, e in table.items()
    if k.startswith("floor:") or k in ("Linen: plain", "Linen: flaxnorm WN")
  ]
  if not rows:
    return []
  lines = [
    "| MLP batch 128, weight-norm floor | ms/step | ratio to its base | time / flaxnorm WN's |",
    "|---|---:|---:|---:|",
  ]
  mine = table.get("Linen: flaxnorm WN", {}).get("times")
  for key, e in rows:
    ratio = "" if e["ratio"] is None else f"{e['ratio']:.2f}"
    if e.get("ci") and e["ci"][0] != e["ci"][1]:
      ratio += f" ({e['ci'][0]:.2f}–{e['ci'][1]:.2f})"
    direct = ""
    if mine and "times" in e and key != "Linen: flaxnorm WN":
      r = stats.paired(e["times"], mine)
      direct = f"{r.median:.2f} ({r.lo:.2f}–{r.hi:.2f})"
    lines.append(f"| {key.removeprefix('floor: ')} | {e['ms']:.2f} | {ratio} | {direct} |")
  return lines


def _by_column(flat: dict[str, float]) -> tuple[dict[str, dict[int, float]], list[int]]:
  """``{"row | 3": x}`` -> ``({row: {3: x}}, sorted columns)``."""
  rows: dict[str, dict[int, float]] = {}
  for key, value in flat.items():
    name, col = key.rsplit(" | ", 1)
    rows.setdefault(name, {})[int(col)] = value
  return rows, sorted({c for r in rows.values() for c in r})


def compile_table(res: dict) -> list[str]:
  if not res["compile"]:
    return []
  rows, ns = _by_column(res["compile"])
  lines = [
    "| SN step (MLP), lower + compile | " + " | ".join(f"n={n}" for n in ns) + " | n=50 / n=1 |",
    "|---|" + "---:|" * (len(ns) + 1),
  ]
  for name, r in rows.items():
    cells = [f"{r[n]:.2f} s" if n in r else "unrolled: skipped" for n in ns]
    growth = f"{r[50] / r[1]:.2f}" if 1 in r and 50 in r else ""
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {growth} |")
  return lines


def sigma_table(res: dict) -> list[str]:
  if not res["sigma"]:
    return []
  rows, ks = _by_column(res["sigma"])
  lines = [
    "| max over layers of abs(σ̂ / σ_SVD − 1), MLP | "
    + " | ".join("init" if k == 0 else f"after {k}" for k in ks)
    + " |",
    "|---|" + "---:|" * len(ks),
  ]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[k]:.1e}" for k in ks) + " |")
  return lines


def memory_table(res: dict) -> list[str]:
  models = sorted(res["steps"], key=lambda k: not k.endswith("float32"))  # float32 first
  lines = [
    "| peak memory (MB), excess over plain / normalized weights | "
    + " | ".join(m.removesuffix(" float32").replace(" bfloat16", " bf16") for m in models)
    + " |",
    "|---|" + "---:|" * len(models),
  ]
  keys = [k for k in _keys({m: res["steps"][m] for m in models}) if not k.endswith("plain")]
  for key in ["Linen: plain", *keys]:
    cells = []
    for m in models:
      e, base = res["steps"][m].get(key), res["steps"][m].get(_face_plain(key))
      if e is None or e["peak"] is None:
        cells.append("")
        continue
      cell = f"{e['peak'] / 2**20:.1f}"
      if base is not None and e["normalized_bytes"]:
        excess = (e["peak"] - base["peak"]) / e["normalized_bytes"]
        cell += f" ({excess:+.2f}{'' if excess <= 1 else ' MISS'})"
      cells.append(cell)
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  return lines


def _face_plain(key: str) -> str:
  face = key.split(": ", 1)[0]
  return "Linen: plain" if face == "floor" else f"{face}: plain"


def torch_table(res: dict) -> list[str]:
  rows = res.get("torch") or {}
  if not rows:
    return []
  models = list(rows)
  names = list(next(iter(rows.values())))
  lines = ["| PyTorch CPU (own process), ratio to plain | " + " | ".join(models) + " |"]
  lines.append("|---|" + "---:|" * len(models))
  for name in names:
    cells = [_torch_cell(rows[m].get(name)) for m in models]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  plain = ", ".join(f"{m} {rows[m]['plain']['ms']:.1f} ms" for m in models if "plain" in rows[m])
  return [*lines, "", f"PyTorch plain step: {plain}."]


def _torch_cell(e: dict | None) -> str:
  if e is None:
    return ""
  ci = e.get("ci")
  return f"{e['ratio']:.2f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci and ci[0] != ci[1] else "")


def _plain_text(text: str) -> str:
  """One Markdown line showing ``text`` as it is (an error's brackets are not links)."""
  return " ".join(text.split()).replace("[", "\\[").replace("]", "\\]")


def markdown(res: dict) -> str:
  cfg = res["cfg"]
  res = {"compile": {}, "sigma": {}, "notes": [], **res}
  total = f"Total {res['total_s']:.0f} s." if "total_s" in res else "Cut short by its time cap."
  head = (
    f"{res['date']}; {res['machine']}; {res['versions']}. "
    f"Interleaved paired rounds (up to {cfg['rounds']}, at least {cfg['min_rounds']}, "
    f"{cfg['steps']} steps each, the fastest kept; faces in a shuffled order, each face's "
    "variants back to back in a shuffled order); ratios are "
    "medians of per-round ratios to the same face's plain step, with 95% bootstrap intervals."
    f"{' QUICK RUN.' if res['quick'] else ''} {total}"
  )
  rounds = {k: next(iter(t.values()))["rounds"] for k, t in res["steps"].items() if t}
  head += " Rounds run: " + ", ".join(f"{k} {n}" for k, n in rounds.items()) + "."
  parts = [head, "", *[f"- {m}: {TITLES[m]}" for m in MODELS], ""]
  for section in (
    step_table(res, "float32"),
    ["bfloat16 params and inputs:", "", *step_table(res, "bfloat16")]
    if step_table(res, "bfloat16")
    else [],
    floor_table(res),
    compile_table(res),
    sigma_table(res),
    memory_table(res),
    torch_table(res),
    [f"- note: {_plain_text(n)}" for n in res["notes"]],
  ):
    if section:
      parts += [*section, ""]
  return "\n".join(parts)


def main(argv: list[str]) -> None:
  """``python _suite_report.py results.json [chart.png]``: the tables (no JAX needed)."""
  import json

  with open(argv[0]) as f:
    res = json.load(f)
  print(markdown(res))
  if len(argv) > 1:
    chart(res, argv[1])


def chart(res: dict, path: str) -> None:
  """Horizontal bars of every variant's ratio to its plain, one panel per model.

  The float32 rows, or the bfloat16 ones when the run has no float32 rows.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dtype = "float32" if any(k.endswith("float32") for k in res["steps"]) else "bfloat16"
  tables = {k: t for k, t in res["steps"].items() if k.endswith(dtype)}
  if not tables:
    return
  fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 6), sharey=True)
  axes = [axes] if len(tables) == 1 else axes
  keys = [k for k in _keys(tables) if not k.endswith("plain") and "side]" not in k]
  for ax, (model, table) in zip(axes, tables.items()):
    ratios = [table[k]["ratio"] if k in table and table[k]["ratio"] else 0 for k in keys]
    cis = [table[k].get("ci") if k in table and table[k]["ratio"] else None for k in keys]
    err = [
      [r - ci[0] if ci else 0 for r, ci in zip(ratios, cis)],
      [ci[1] - r if ci else 0 for r, ci in zip(ratios, cis)],
    ]
    colors = ["tab:blue" if "flaxnorm" in k else "tab:gray" for k in keys]
    ax.barh(range(len(keys)), ratios, color=colors, xerr=err, error_kw={"lw": 0.8})
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlim(0.8, max(1.6, max(ratios) + 0.05))
    ax.set_title(model.removesuffix(" float32"))  # bfloat16 panels keep their dtype
    ax.set_xlabel("train step / plain")
  axes[0].set_yticks(range(len(keys)), keys, fontsize=8)
  axes[0].invert_yaxis()
  where = res["machine"].split(",")[0]
  if res["gpu"]:  # "..., device gpu (NVIDIA H200)": the GPU's name
    where = res["machine"].rsplit("(", 1)[-1].rstrip(")")
  fig.suptitle(f"flaxnorm (blue) and peers (95% intervals), {res['date']}, {where}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
