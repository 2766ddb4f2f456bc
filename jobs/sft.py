"""What `ray job submit` runs: train (+ export + before/after eval) from a YAML config.

    ray job submit --working-dir . -- python jobs/sft.py --config jobs/configs/local-cpu.yaml [key=value ...]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for --working-dir

from sft_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    sys.exit(main(["train", a.config, *a.overrides]))
