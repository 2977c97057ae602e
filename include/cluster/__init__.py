"""The CeleryExecutor shape of docker-compose.yaml as local processes (``make cluster``); see manager.py."""
