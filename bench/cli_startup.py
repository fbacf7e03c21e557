"""How fast the `renderfarm` CLI starts: the producer side must not import torch.

    .venv/bin/python bench/cli_startup.py --runs 10

Times `renderfarm --help`, `renderfarm submit --help` and a `renderfarm status` against no
farm (which imports the client, connects nowhere and exits with its error) as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "renderfarm --help": ["--help"],
    "renderfarm submit --help": ["submit", "--help"],
    "renderfarm status X (no farm)": ["status", "X"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env["RENDERFARM_DATA_DIR"] = tmp
        for name, argv in COMMANDS.items():
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "renderfarm", *argv], env=env,
                               capture_output=True, check=False)
                times.append(time.perf_counter() - t)
            results[name] = {"median_s": round(statistics.median(times), 3),
                             "max_s": round(max(times), 3)}
    print(json.dumps({"bench": "cli_startup", "runs": args.runs, "results": results,
                      "target": "well under 1 s"}, indent=2))


if __name__ == "__main__":
    main()
