"""The OpenSearch support-index sink (contract §6). Placeholder until the sink lands:
`attach` adds nothing, so the Redis path runs alone."""

from __future__ import annotations

import logging
from typing import Any

from dataflow.config import OpenSearchSettings

log = logging.getLogger(__name__)


def attach(writes: Any, settings: OpenSearchSettings) -> None:
    log.warning("the OpenSearch sink is not built yet; only Redis is written")
