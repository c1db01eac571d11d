"""Keep a finished pipeline run's results with what produced them: its metrics/eval.json, every stage's numeric
metrics, the params it ran with, the package versions (versions/eval.json) and its git commit, in one JSON file
under bench/results/. The real-speech comparisons in docs/real-speech.md are stored this way.

    python bench/record_run.py ../abl-speed real_speech_speed_perturb --command "dvc exp run $P -S ..."
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from voiceprint.core.outputs import versions_path, write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def record(run: Path, command: str, wall: str) -> dict:
    evaluation = run / "metrics/eval.json"
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted(evaluation.parent.glob("*.json")) if p != evaluation}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run, capture_output=True, text=True,
                            check=True).stdout.strip()
    return {
        "command": command,
        "commit": commit,
        "wall": wall,
        "params": yaml.safe_load((run / "params.yaml").read_text()),
        "versions": json.loads(versions_path(evaluation).read_text()),
        "stage_metrics": metrics,
        "eval": json.loads(evaluation.read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a repository (copy) where `dvc repro`/`dvc exp run` finished")
    parser.add_argument("name", help="written to bench/results/NAME.json")
    parser.add_argument("--command", required=True, help="the command that produced the run, as documented")
    parser.add_argument("--wall", default="", help="its wall time and what else shared the machine, as measured")
    args = parser.parse_args()
    out = RESULTS / f"{args.name}.json"
    write_text(out, json.dumps(record(args.run, args.command, args.wall), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
