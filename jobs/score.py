"""Ray job entrypoint: `engagesim score` — Batch-score a posts or interactions dataset with a run's ensemble on Ray Data.
  ray job submit --working-dir . -- python jobs/score.py --run s3://BUCKET/runs/ID --in s3://BUCKET/new_posts --out s3://BUCKET/scores/1

Every option of `engagesim score --help` applies; the job joins the cluster it was submitted to.
"""

import sys

from engagesim.cli import app

if __name__ == "__main__":
    app(["score", *sys.argv[1:]])
