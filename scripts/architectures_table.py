"""The ECG5000 comparison across cells as one Markdown table, from the summary.json files of `nrnn-compare`.

    python scripts/architectures_table.py docs/results/ecg5000 docs/results/ecg5000_antisymmetric \
        docs/results/ecg5000_gru docs/results/ecg5000_tanh docs/results/ecg5000_lstm

Per cell and mode: clean test accuracy and accuracy under white noise of std 1.0 (mean ± std over seeds),
and, in the explicit row, the share of the implicit gain under that noise that the explicit penalty recovers:
(explicit − deterministic) / (implicit − deterministic), from the seed means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"lipschitz": "Lipschitz", "antisymmetric": "antisymmetric", "gru": "GRU", "tanh": "tanh", "lstm": "LSTM"}


def _at(curve: dict, strength: float) -> tuple[float, float]:
    i = [round(s, 6) for s in curve["strengths"]].index(round(strength, 6))
    return curve["mean"][i], curve["std"][i]


def rows(folder: Path, white: float) -> list[str]:
    summary = json.loads((folder / "summary.json").read_text())
    cell = NAMES.get(summary["settings"]["model"].get("cell", "lipschitz"), summary["settings"]["model"].get("cell"))
    agg = summary["aggregate"]
    seeds = len(summary["settings"]["seeds"])
    clean = {m: (agg[m]["test_acc"]["mean"], agg[m]["test_acc"]["std"]) for m in agg}
    noisy = {m: _at(agg[m]["curves"]["white"], white) for m in agg}
    out = []
    for mode in ("deterministic", "implicit", "explicit"):
        share = ""
        if mode == "explicit":
            gain = noisy["implicit"][0] - noisy["deterministic"][0]
            share = (f"{(noisy['explicit'][0] - noisy['deterministic'][0]) / gain:.0%}" if gain > 0
                     else "— (no implicit gain)")
        out.append(f"| {cell} | {mode} | {clean[mode][0]:.4f} ± {clean[mode][1]:.4f} | "
                   f"{noisy[mode][0]:.4f} ± {noisy[mode][1]:.4f} | {share} | {seeds} |")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="nrnn-compare output folders (with summary.json)")
    parser.add_argument("--white", type=float, default=1.0, help="std of the white input noise (default: 1.0)")
    args = parser.parse_args(argv)
    print(f"| cell | mode | clean | white σ = {args.white:g} | share of implicit's gain recovered | seeds |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        print("\n".join(rows(folder, args.white)))


if __name__ == "__main__":
    main()
