"""Ray job entrypoint: `engagesim tune` — Search XGBoost parameters with Ray Tune (ASHA) and write the best as a config overlay.
  ray job submit --working-dir . -- python jobs/tune.py --features s3://BUCKET/runs/ID/features --out best.yaml

Every option of `engagesim tune --help` applies; the job joins the cluster it was submitted to.
"""

import sys

from engagesim.cli import app

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])
