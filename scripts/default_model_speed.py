"""Speed of the embedded default model: sampling time for one 64x64 image at the default settings,
and the wall time of the whole `ldm generate` command (start-up and loading included).

    .venv/bin/python scripts/default_model_speed.py --runs 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle to the left of a blue square"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from ldm.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(None)
    load_s = time.perf_counter() - start
    pipe.progress = False
    pipe(PROMPT, seed=0)  # warm-up
    sampling = []
    for seed in range(args.runs):
        start = time.perf_counter()
        pipe(PROMPT, seed=seed, output_type="np")  # sampling and decoding
        sampling.append(time.perf_counter() - start)
    whole = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ldm.cli", "generate", PROMPT, "--seed", str(i), "--quiet",
                            "--out", str(Path(tmp) / "x.png")], check=True, capture_output=True)
            whole.append(time.perf_counter() - start)
    report = {"sampling_s_median": statistics.median(sampling), "sampling_s": sampling,
              "steps": 25, "sampler": "dpmpp_2m", "guidance_scale": 7.5, "load_s": load_s,
              "generate_command_s_median": statistics.median(whole), "generate_command_s": whole}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
