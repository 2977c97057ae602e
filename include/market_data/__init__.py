"""The pipeline's domain code: config, storage, ingestion, curation, signal.

It uses the Binance provider (``binance_provider``, installed from ``plugins/`` by ``make``;
see plugins/pyproject.toml), so nothing here edits ``sys.path``.
"""
