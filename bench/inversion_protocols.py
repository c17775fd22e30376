"""Concept inversion under this toolkit's settings and under Pham et al.'s (`--preset pham`), against
one SalUn erasure of "seven" from the embedded digits model: which setting recovers the concept.

Each row is `python -m eval attack --attack inversion` as a user runs it, on the concept's first 8
prompts, judged by the held-out digits classifier; the erasure is `erase/train.py --model digits
--concept seven --seed 0` (the recipe in prompts/digits.yaml).

    python bench/inversion_protocols.py --out bench/results/inversion_protocols.json
    python bench/inversion_protocols.py --from-reports DIR --out ...   # tables from reports already made
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine, save_results  # bench/common.py (the scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]
ROWS = {  # name: the options beside --attack inversion
    "plain": [],
    "plain_heldout": ["--inversion-heldout"],
    "pham": ["--preset", "pham", "--inversion-flip"],
    "pham_lr5e-3": ["--preset", "pham", "--inversion-flip", "--inversion-lr", "5e-3"],
    "pham_noflip": ["--preset", "pham", "--no-inversion-flip"],
}


def run_rows(folder: Path, erased: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if not (erased / "erase_config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "erase/train.py"), "--model", "digits", "--concept", "seven", "--seed", "0",
                        "--output-dir", str(erased), "--cache-dir", str(folder / "cache")], env=env, check=True)
    for name, extra in ROWS.items():
        subprocess.run([sys.executable, "-m", "eval", "attack", "--model", str(erased), "--original", "digits", "--attack",
                        "inversion", "--limit", "8", *extra, "--out", str(folder / f"{name}.json")], env=env, cwd=ROOT, check=True)


def summarise(folder: Path) -> dict:
    rows = {}
    for name in ROWS:
        report = json.loads((folder / f"{name}.json").read_text())
        p = report["protocol"]
        rows[name] = {"recovery": report["recovery"], "num_prompts": report["num_prompts"],
                      "train_seconds": report["inversion"]["train_seconds"], "trained_on": report["inversion"]["trained_on"],
                      "loss_first_50": report["inversion"]["loss_trace"][0], "loss_last_50": report["inversion"]["loss_trace"][-1],
                      "settings": {k: p[k] for k in ("preset", "inversion_steps", "inversion_lr", "inversion_batch_size",
                                                     "inversion_accumulation", "inversion_weight_decay", "inversion_init",
                                                     "inversion_flip", "inversion_heldout")},
                      "command_options": ROWS[name]}
    return {"rows": rows, "erased": "erase/train.py --model digits --concept seven --seed 0", "machine": machine(1)}


def markdown(result: dict) -> str:
    lines = ["# Concept inversion: this toolkit's settings and Pham et al.'s, on SalUn's erasure of \"seven\"", "",
             f"Erasure: `{result['erased']}`. Each row: `python -m eval attack --attack inversion --limit 8` with the "
             "options shown; recovery = the erased model's images with the learned token judged \"seven\" by the "
             "held-out digits classifier (8 prompts, one image each).", "",
             "| options | steps | lr | batch x accumulation | AdamW decay | init | flips | learns from | recovery | train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        s = r["settings"]
        options = " ".join(r["command_options"]) or "(defaults)"
        lines.append(f"| `{options}` | {s['inversion_steps']} | {s['inversion_lr']:g} | {s['inversion_batch_size']} x "
                     f"{s['inversion_accumulation']} | {s['inversion_weight_decay']:g} | {s['inversion_init'] or 'mean'} | "
                     f"{'yes' if s['inversion_flip'] else 'no'} | {'other seeds' if s['inversion_heldout'] else 'the measured seeds'} | "
                     f"{r['recovery']:.1%} | {r['train_seconds']:.0f} |")
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", f"Machine: {result['machine']}; runs made one at a time beside other work."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--from-reports", default=None, help="folder holding the rows' reports already made")
    parser.add_argument("--work-dir", default="inversion-protocols", help="where the erasure and the reports go")
    parser.add_argument("--note", default=None, help="a sentence about how the reports were made, kept in the results")
    args = parser.parse_args()
    start = time.time()
    folder = Path(args.from_reports or args.work_dir)
    if not args.from_reports:
        folder.mkdir(parents=True, exist_ok=True)
        run_rows(folder, folder / "seven-salun")
    result = summarise(folder) | {"wall_seconds": None if args.from_reports else round(time.time() - start, 1),
                                  "note": args.note}
    save_results(result, args.out, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
