"""Ray job entrypoint: the content pipeline (data → captions → LoRA LLM → hashtags → image LoRA → content run).

Locally: `python jobs/content.py --config configs/content.yaml` (what `make content` runs).
On a cluster: `ray job submit --working-dir . -- python jobs/content.py --config configs/content.yaml`
with `--set content.llm.use_gpu=true --set content.llm.workers=2` to tune on GPU nodes.
"""

import argparse
import json
import sys

from engagesim.cli import quiet_ray
from engagesim.config import ConfigError, load_config
from engagesim.pipeline.content import run


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
    print(json.dumps({"run": job.uri, "status": job.manifest["status"], "metrics": job.manifest["metrics"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
