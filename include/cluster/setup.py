"""One Airflow process for what ``make cluster`` needs in the metadata DB before the scheduler starts
(each ``airflow`` CLI call costs ~5 s of start-up): the Binance pool and both Binance connections,
the same ones ``make airflow-setup`` and docker-compose's ``airflow-init`` create. With ``--check``:
exit 0 only when the scheduler, dag-processor and triggerer are heartbeating and every named
Celery worker answers a ping.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def create_pool_and_connections(pool_slots: int) -> None:
    from airflow.models import Connection, Pool
    from airflow.utils.session import create_session

    pool = os.environ.get("BINANCE_POOL", "binance_api")
    Pool.create_or_update_pool(pool, pool_slots, "Binance REST (every task calling Binance)", include_deferred=False)
    hosts = {"binance_default": os.environ["BINANCE_HOST"], "binance_archive": os.environ["BINANCE_ARCHIVE_HOST"]}
    with create_session() as session:
        for conn_id, host in hosts.items():
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()
            session.add(Connection(conn_id=conn_id, conn_type="http", host=host))
    print(f"pool {pool}={pool_slots}; " + "; ".join(f"{c} -> {h}" for c, h in hosts.items()))


def components_up(workers: list[str]) -> list[str]:
    """What is not up yet (empty when everything is)."""
    from airflow.jobs.job import Job, JobState
    from airflow.utils.session import create_session

    missing = []
    with create_session() as session:
        for job_type in ("SchedulerJob", "DagProcessorJob", "TriggererJob"):
            jobs = session.query(Job).filter(Job.job_type == job_type, Job.state == JobState.RUNNING).all()
            if not any(job.is_alive() for job in jobs):
                missing.append(job_type)
    if workers:
        from airflow.providers.celery.executors.celery_executor import app

        answered = set()
        for reply in app.control.ping(timeout=2.0) or []:
            answered.update(reply)
        host = socket.gethostname()
        missing += [name for name in workers if f"{name}@{host}" not in answered]
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include.cluster.setup")
    parser.add_argument("--pool-slots", type=int)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--worker", action="append", default=[])
    args = parser.parse_args(argv)
    if args.check:
        missing = components_up(args.worker)
        if missing:
            print("not up yet: " + ", ".join(missing))
        return 1 if missing else 0
    create_pool_and_connections(args.pool_slots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
