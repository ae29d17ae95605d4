"""End-to-end denoising-step latency of Wan-shaped transformers: ``sagesla bench-e2e`` as a script.

Usage and method: ``sagesla/e2e.py`` (``python scripts/bench_e2e.py --help``).
"""

import sys

from sagesla.e2e import main

if __name__ == "__main__":
    sys.exit(main())
