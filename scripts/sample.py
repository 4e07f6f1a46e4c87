#!/usr/bin/env python
"""Sample with a ControlNet from the command line (thin wrapper of controlnet.cli; installed as `cn-sample`).

    python scripts/sample.py --image photo.png --prompt "red circle with blue background" --out outputs/samples
    python scripts/sample.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlnet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
