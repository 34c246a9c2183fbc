"""Copy an fp32 export with one planted defect (tgedge.defects), to prove that `tgedge validate` catches it.

    python scripts/plant_defect.py EXPORT_DIR OUT_DIR DEFECT

DEFECT: decoder-mlp | rms-eps | qkv-bias | vision-transpose (tgedge/defects.py says what each changes).
Then `tgedge validate OUT_DIR --data D --reference CHECKPOINT` must FAIL naming the defect's stage.
"""

from __future__ import annotations

import argparse
import sys

from tgedge.defects import DEFECTS, plant
from tgedge.errors import TgedgeError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("out")
    ap.add_argument("defect", choices=list(DEFECTS))
    args = ap.parse_args()
    try:
        print(f"{args.out}: {args.defect} ({DEFECTS[args.defect]}): {plant(args.export, args.out, args.defect)}")
    except TgedgeError as e:
        print(f"plant_defect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
