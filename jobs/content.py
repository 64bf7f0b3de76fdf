"""Ray job entrypoint: the content pipeline (data → captions → LoRA LLM → hashtags → image LoRA → content run).

Locally: `python jobs/content.py --config configs/content.yaml` (what `make content` runs).
On a cluster: `ray job submit --working-dir . -- python jobs/content.py --config configs/content.yaml`
with `--set content.llm.use_gpu=true --set content.llm.workers=2` to tune on GPU nodes.

Every option of `engagesim pipeline content --help` applies (--set, --preset, --data, --run-id, --json); the job
joins the cluster it was submitted to when the config says ray.address: auto.
"""

import sys

from engagesim.cli import app

if __name__ == "__main__":
    app(["pipeline", "content", *sys.argv[1:]], prog_name="engagesim")
