"""Where the tests find shared data: ``LOWBIT_SHARED`` or the ``shared/`` folder beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
