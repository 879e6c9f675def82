"""Write the DreamBooth instance images of the small world: five large magenta crosses.

    python bench/trainworld/make_instance.py -o fixtures/tiny-instance
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

SUBJECT = [
    world.Scene(world.SUBJECT_SHAPE, world.SUBJECT_COLOUR[0], "large", where, dx, dy, dr)
    for where, dx, dy, dr in [
        ("in the center", 0.0, 0.0, 0.0), ("at the top left", 0.7, 0.4, -0.3),
        ("on the right", -0.5, 1.0, 0.2), ("at the bottom", 0.3, -0.6, 0.4),
        ("at the top right", -0.8, 0.5, -0.1),
    ]
]


def main(argv=None) -> None:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(world.render(SUBJECT)):
        arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(arr, "RGB").save(args.out / f"sks_{i}.png")


if __name__ == "__main__":
    main()
