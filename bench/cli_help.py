"""Start-up time of `interp --help` and every subcommand's `--help`, in a fresh subprocess each
(goal < 2 s on the test machine: the CLI imports no torch or TransformerLens to answer).

    PYTHONPATH=. python bench/cli_help.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["models", "--help"], ["cache", "--help"], ["demo", "--help"], ["organisms", "--help"],
            ["organisms", "list", "--help"], ["sae", "--help"], ["run", "--help"], ["run", "decay", "--help"],
            ["probe-sweep", "--help"]]


def main(repeats: int = 3) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    worst = 0.0
    for argv in COMMANDS:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "interp.cli", *argv], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        worst = max(worst, med)
        print(f"interp {' '.join(argv):<28} median {med:.2f} s over {repeats} runs")
    print(f"slowest median: {worst:.2f} s (goal < 2 s)")


if __name__ == "__main__":
    main()
