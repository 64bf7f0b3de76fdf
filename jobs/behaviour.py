"""Ray job entrypoint: the behaviour pipeline (data → EDA → features → models → evaluation).

Locally: `python jobs/behaviour.py --config configs/local.yaml` (what `make demo` runs).
On a cluster: `ray job submit --working-dir . -- python jobs/behaviour.py --config configs/cluster.yaml`.

Every option of `engagesim pipeline behaviour --help` applies (--set, --preset, --data, --run-id, --json); the job
joins the cluster it was submitted to when the config says ray.address: auto.
"""

import sys

from engagesim.cli import app

if __name__ == "__main__":
    app(["pipeline", "behaviour", *sys.argv[1:]], prog_name="engagesim")
