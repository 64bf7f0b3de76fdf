"""Ray job entrypoint: the behaviour pipeline (data → EDA → features → models → evaluation).

Locally: `python jobs/behaviour.py --config configs/local.yaml` (what `make demo` runs).
On a cluster: `ray job submit --working-dir . -- python jobs/behaviour.py --config configs/cluster.yaml`.
"""

import argparse
import json
import sys

from engagesim.cli import print_metrics, quiet_ray
from engagesim.config import ConfigError, load_config
from engagesim.pipeline.behaviour import run
from engagesim.report import metric_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], help="override: section.key=value (repeatable)")
    parser.add_argument("--run-id", default=None, help="name of the run directory (default: generated)")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    quiet_ray()
    job = run(config, args.run_id)
    print_metrics(metric_rows(job.manifest["metrics"]))
    report = job.manifest["stages"].get("report", {}).get("outputs", {}).get("report")
    print(f"run directory: {job.uri}\nreport: {report}")
    print(json.dumps({"run": job.uri, "status": job.manifest["status"], "report": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
