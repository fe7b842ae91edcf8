"""Draw the docs' plots from committed results files: ``python scripts/make_plots.py``.

Every point comes from a file under ``benchmarks/results/`` or ``loadtests/results/``; a plot whose file is missing
is skipped with a message, never drawn from numbers typed here. Writes into ``docs/images/``:

- ``latency-vs-concurrency.png``: the H100 Locust sweep through Serve's proxy, TTFT and TPOT against users, with
  W4's direct-ingress run at 100 users beside it.
- ``spec-throughput-vs-batch.png``: output tokens/s against batch size for each speculative proposer on GPT-2 XL,
  before and after the small-M fused linears.
- ``spec-speedup-vs-acceptance.png``: speed-up over no speculation against the measured acceptance rate: the
  oracle (100 %), the always-wrong and random-draft proposers (0 %) and the trained pair in between.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
H100_SWEEP = ROOT / "loadtests" / "results" / "h100-2026-11-24" / "sweep.json"
W4 = RESULTS / "2026-11-24_W4_H100.json"
SPEC = {"d6cfdb2": RESULTS / "2026-11-24_spec-decode_H100_d6cfdb2.json",
        "2bf9a02 (small-M fused linears)": RESULTS / "2026-11-24_spec-decode_H100_2bf9a02.json"}
TRAINED_PAIR = RESULTS / "2026-11-24_spec-trained-pair_H100.json"
PROPOSER_COLORS = {"no-spec": "black", "oracle": "tab:green", "always-wrong": "tab:red", "draft": "tab:blue",
                   "ngram": "tab:orange"}


def _load(path: Path):
    if not path.exists():
        print(f"skipped: {path.relative_to(ROOT)} is not there")
        return None
    return json.loads(path.read_text())


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    # No timestamp or version in the file: redrawing unchanged data leaves the committed PNG unchanged.
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {out.relative_to(ROOT)}")


def latency_vs_concurrency(out_dir: Path) -> None:
    sweep = _load(H100_SWEEP)
    if sweep is None:
        return
    steps = sorted(sweep["steps"], key=lambda s: s["users"])
    users = [s["users"] for s in steps]
    fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(9, 3.6))
    # The 1-user step's p99 is the first request waiting for start-up (26 s): it would flatten the whole axis.
    ttft.plot(users, [s["ttft_ms_p50"] for s in steps], "o-", label="TTFT p50, via proxy")
    ttft.plot(users[1:], [s["ttft_ms_p99"] for s in steps[1:]], "o--", label="TTFT p99, via proxy")
    tpot.plot(users, [s["tpot_ms_p50"] for s in steps], "o-", label="TPOT p50, via proxy")
    tpot.plot(users, [s["tpot_ms_p99"] for s in steps], "o--", label="TPOT p99, via proxy")
    w4 = _load(W4)
    direct = next((r for r in w4 or [] if r.get("path", "").startswith("HTTP, direct ingress")), None)
    if direct is not None:
        ttft.plot([direct["concurrency"]], [direct["ttft_ms_p50"]], "k*", ms=11, label="TTFT p50, direct ingress (W4)")
        tpot.plot([direct["concurrency"]], [direct["tpot_ms_p50"]], "k*", ms=11, label="TPOT p50, direct ingress (W4)")
    for ax, name in ((ttft, "time to first token (ms)"), (tpot, "time per output token (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(users, [str(u) for u in users])
        ax.set_xlabel("concurrent streaming users")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("GPT-2 XL fp16 on one H100 through Ray Serve: latency against concurrency", fontsize=10)
    _save(fig, out_dir / "latency-vs-concurrency.png")


def spec_throughput_vs_batch(out_dir: Path) -> None:
    runs = {label: data for label, path in SPEC.items() if (data := _load(path)) is not None}
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    for (label, records), style in zip(runs.items(), ("o-", "s--")):
        for mode, color in PROPOSER_COLORS.items():
            points = sorted((r["batch_size"], r["out_tok_s"]) for r in records if r["mode"] == mode)
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{mode}, {label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch_size"] for records in runs.values() for r in records})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (requests decoding together)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("GPT-2 XL fp16 on one H100, k = 4 proposals per step", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, out_dir / "spec-throughput-vs-batch.png")


def spec_speedup_vs_acceptance(out_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    drawn = False
    for (label, path), marker in zip(SPEC.items(), ("o", "s")):
        records = _load(path)
        for r in records or []:
            if r.get("speedup_vs_no_spec") is None:
                continue
            ax.scatter(100 * r["acceptance_rate"], r["speedup_vs_no_spec"], marker=marker, s=18 + 4 * r["batch_size"],
                       color=PROPOSER_COLORS[r["mode"]], alpha=0.8, label=f"GPT-2 XL {r['mode']}, {label}")
            drawn = True
    for r in _load(TRAINED_PAIR) or []:
        if r.get("speedup_tpot") is None:
            continue
        ax.scatter(100 * r["acceptance"], r["speedup_tpot"], marker="^", s=18 + 4 * r["batch"],
                   color=PROPOSER_COLORS[r["mode"]], alpha=0.8, label=f"trained small pair, {r['mode']}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return
    ax.axhline(1.0, color="gray", lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per series, not per batch size
    legend = ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    for handle in legend.legend_handles:
        handle.set_sizes([30])
    ax.set_xlabel("acceptance rate of the proposals (%)")
    ax.set_ylabel("speed-up of TPOT over no speculation")
    ax.set_title("Speculative decoding, k = 4 (marker size: batch size)", fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, out_dir / "spec-speedup-vs-acceptance.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in (latency_vs_concurrency, spec_throughput_vs_batch, spec_speedup_vs_acceptance):
        plot(args.out)


if __name__ == "__main__":
    main()
