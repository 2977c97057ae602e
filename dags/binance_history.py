"""binance_history — deep history, manual only: plan -> ingest_chunk (mapped) -> curate (per interval) -> quality -> report.

* **plan** checks the params and splits ``[start, end)`` into chunks of symbol x interval x calendar
  month (consecutive months share a chunk when there would be more than ``[core] max_map_length``).
* **ingest_chunk**, mapped over the chunks in the Binance pool: ``source=auto`` takes Binance's
  public data archive (checksummed monthly files for whole published months, daily files for
  published days) and REST for the rest and for any file missing or refused; ``archive`` the
  archive alone; ``rest`` REST alone. Each chunk is idempotent and redoes only itself when
  retried or cleared. Its log shows the run's progress: chunks done / total, candles, ETA.
* **curate**, one per interval, over every day the chunks wrote.
* **quality**: the cross-timeframe check over the range (15m -> 30m -> 1h -> 4h -> 1d, 1d -> 1w);
  findings go to ``RAW_DATA_DIR/_quality/`` and the ``quality.<interval>.findings`` metric.
* **report** fails the run naming the chunks that were not ingested.

Use it for deep history; ``airflow backfill create`` on ``binance_klines_<interval>`` is for recent
ranges (one run per schedule slot). Thin on purpose: the task bodies are in
``include.market_data.history``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Param, dag, task

from include.market_data.alerting import binance_task_defaults
from include.market_data.config import SYMBOL_PATTERN, load_settings

SETTINGS = load_settings()
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2})?(Z|[+-]\d{2}:?\d{2})?)?$"
CHUNK_LABEL = "{{ chunk_label }}"


def _label(text: str) -> None:
    from airflow.sdk import get_current_context

    get_current_context()["chunk_label"] = text


@dag(
    dag_id="binance_history",
    description="Deep history: plan -> ingest_chunk (symbol x interval x month, mapped) -> curate -> quality -> report",
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    max_active_tasks=8,
    dagrun_timeout=timedelta(hours=48),
    tags=["binance", "market-data", "history"],
    default_args=binance_task_defaults(),
    params={
        "start": Param(SETTINGS.ingest_start.isoformat(), type="string", pattern=DATE_PATTERN, title="start (UTC)",
                       description="First day, inclusive, UTC: 2017-08-17 (BTCUSDT's first candle)."),
        "end": Param(None, type=["null", "string"], pattern=DATE_PATTERN, title="end (UTC)",
                     description="Last day, exclusive, UTC: 2024-01-01. Empty: up to the last closed candle."),
        "intervals": Param(list(SETTINGS.intervals), type="array", minItems=1, uniqueItems=True,
                           items={"type": "string", "enum": list(SETTINGS.intervals)}, title="intervals",
                           description="Timeframes, one per line: 15m, 1h. Default: every configured one."),
        "symbols": Param(list(SETTINGS.symbols), type="array", minItems=1, uniqueItems=True,
                         items={"type": "string", "pattern": SYMBOL_PATTERN, "enum": list(SETTINGS.symbols)},
                         title="symbols", description="Symbols of BINANCE_SYMBOLS, one per line: BTCUSDT."),
        "source": Param("auto", type="string", enum=["auto", "archive", "rest"], title="source",
                        description="auto: the public data archive where published, REST for the rest; "
                                    "archive: the archive alone; rest: REST alone."),
    },
    doc_md=__doc__,
)
def binance_history():
    # plan hands on its list of chunks (Airflow maps over a task's whole return value only).
    @task
    def plan(params=None) -> list[dict]:
        from include.market_data import history
        from include.market_data.pipeline import fail_fast_on_user_error

        return fail_fast_on_user_error(history.plan)(dict(params or {}))["chunks"]

    @task(pool=SETTINGS.pool, map_index_template=CHUNK_LABEL)
    def ingest_chunk(chunk: dict, run_id=None, dag_run=None) -> dict:
        from include.market_data import history
        from include.market_data.pipeline import fail_fast_on_user_error

        _label(history.label(chunk))
        started = dag_run.start_date.timestamp() if dag_run is not None and dag_run.start_date else None
        return fail_fast_on_user_error(history.ingest_chunk)(chunk, run_id or "manual", started)

    @task
    def intervals(chunks: list[dict]) -> list[str]:
        from include.market_data import history

        return history.span(chunks)["intervals"]

    @task(trigger_rule="all_done", map_index_template="{{ task.op_kwargs['interval'] }}")
    def curate(interval: str, results) -> dict:
        from include.market_data import history

        return history.curate(interval, results)

    @task(trigger_rule="all_done")
    def quality(chunks: list[dict]) -> dict:
        from include.market_data import history

        return history.quality(history.span(chunks) if chunks else None)

    @task(trigger_rule="all_done")
    def report(chunks: list[dict], results, curated, checked, run_id=None) -> dict:
        from include.market_data import history

        return history.report(history.span(chunks) if chunks else None, results, curated, checked,
                              run_id or "manual")

    chunks = plan()
    results = ingest_chunk.expand(chunk=chunks)
    curated = curate.partial(results=results).expand(interval=intervals(chunks))
    checked = quality(chunks)
    curated >> checked
    report(chunks, results, curated, checked)


binance_history()
