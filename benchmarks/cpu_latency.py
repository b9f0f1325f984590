"""Script wrapper of ``repvit bench`` (same arguments), for running from a checkout.

    python benchmarks/cpu_latency.py --models all --runtimes eager onnxruntime onnxruntime_int8 openvino \
        --downstream --json results/cpu_latency.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install

from repvit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
