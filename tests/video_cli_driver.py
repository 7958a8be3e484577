"""`hooked-vit` in a subprocess for tests/test_video_cli.py, with clips read slowly enough that
the test can kill -9 the run between two batches.

    python tests/video_cli_driver.py SECONDS_PER_CLIP identify --model ... --out ...

Every embedded clip (`MovingShapes.__getitem__`) waits SECONDS_PER_CLIP before it is
rendered; what it renders, and so the run's results, are unchanged.
"""

from __future__ import annotations

import sys
import time

from circuits.cli import main
from circuits.embedded.synthetic_video import MovingShapes

if __name__ == "__main__":
    delay = float(sys.argv[1])
    render = MovingShapes.__getitem__

    def slow(self, index):
        time.sleep(delay)
        return render(self, index)

    MovingShapes.__getitem__ = slow
    sys.exit(main(sys.argv[2:]))
