"""The pipeline's domain code: config, storage, ingestion, curation, signal.

It uses the Binance provider in ``plugins/`` (``binance_provider``). Airflow puts the plugins
folder on ``sys.path``; a plain Python shell started at the project root gets it here, so
``from include.market_data.ingestion import DataIngestion`` works there too.
"""

import sys
from pathlib import Path

_PLUGINS = str(Path(__file__).resolve().parents[2] / "plugins")
if _PLUGINS not in sys.path:
    sys.path.append(_PLUGINS)
