"""Ray job entrypoint: `engagesim synth` — Generate a synthetic world (users, posts, impressions, media, ground truth) on Ray Data.
  ray job submit --working-dir . -- python jobs/synth.py --config configs/cluster.yaml --out s3://BUCKET/worlds/w1

Every option of `engagesim synth --help` applies; the job joins the cluster it was submitted to.
"""

import sys

from engagesim.cli import app

if __name__ == "__main__":
    app(["synth", *sys.argv[1:]])
