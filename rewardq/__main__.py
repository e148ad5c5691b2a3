"""``python -m rewardq``: the console script."""

from rewardq.cli import main

raise SystemExit(main())
