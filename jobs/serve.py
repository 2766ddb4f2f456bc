"""What `ray job submit` runs to serve a trained model (OpenAI-compatible API on Ray Serve).

    ray job submit --working-dir . -- python jobs/serve.py --model-dir /shared/runs/x/model [serve.port=8000 ...]

For long-lived clusters, prefer `serve deploy deploy/serve/sft-ray.yaml` (survives the job's driver).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sft_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--config")
    p.add_argument("--api-key-env")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    argv = ["serve", a.model_dir, *a.overrides]
    if a.config:
        argv += ["--config", a.config]
    if a.api_key_env:
        argv += ["--api-key-env", a.api_key_env]
    sys.exit(main(argv))
