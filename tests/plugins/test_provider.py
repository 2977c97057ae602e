"""The provider stands alone: it imports nothing from ``include`` and needs no pipeline setting."""

import ast
from pathlib import Path

import pytest

from binance_provider.facts import HookSettings, validate_symbol

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def test_no_module_under_plugins_imports_include():
    offenders = []
    for path in sorted(PLUGINS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(PLUGINS)}: {name}" for name in names
                          if name == "include" or name.startswith("include.")]
    assert offenders == []


def test_the_hook_does_not_fail_on_an_unrelated_bad_pipeline_variable(monkeypatch):
    from binance_provider.hooks.binance import BinanceHook

    monkeypatch.setenv("RECOMMENDATION_UPDATE_TIME", "noon")  # the pipeline's config refuses this
    monkeypatch.setenv("BINANCE_MAX_CONCURRENCY", "3")
    hook = BinanceHook()
    assert hook.settings == HookSettings(max_concurrency=3)


@pytest.mark.parametrize("name, value", [("BINANCE_RATE_LIMIT_WEIGHT", "lots"), ("BINANCE_RATE_LIMIT_SAFETY", "1.5"),
                                         ("BINANCE_MAX_CONCURRENCY", "0"), ("LOG_LEVEL", "LOUD")])
def test_a_bad_hook_variable_is_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        HookSettings.from_env()


def test_the_pipeline_settings_build_the_hook_settings():
    from include.market_data.config import load_settings

    settings = load_settings({"BINANCE_RATE_LIMIT_WEIGHT": "1200", "BINANCE_MAX_CONCURRENCY": "2"})
    assert settings.hook_settings() == HookSettings(rate_limit_weight=1200, max_concurrency=2)
    assert settings.rate_limit_budget == 960 and validate_symbol("BTCUSDT") == "BTCUSDT"


def test_the_provider_is_an_installed_distribution_airflow_registers(tmp_path):
    """Nothing on sys.path but the installed packages: the hook imports, and Airflow's providers
    manager lists the provider through its apache_airflow_provider entry point."""
    import os
    import subprocess
    import sys

    probe = ("import binance_provider.hooks.binance as hook\n"
             "from airflow.providers_manager import ProvidersManager\n"
             "info = ProvidersManager().providers['binance-provider']\n"
             "print(hook.BinanceHook.hook_name, info.version)\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "Binance 0.1.0"


def test_every_registered_hook_module_defines_an_http_hook():
    """get_provider_info lists the REST hook and the archive hook; each is an HttpHook on an http connection."""
    import importlib
    import inspect

    from airflow.providers.http.hooks.http import HttpHook

    from binance_provider import get_provider_info

    modules = [name for entry in get_provider_info()["hooks"] for name in entry["python-modules"]]
    assert modules == ["binance_provider.hooks.binance", "binance_provider.hooks.archive"]
    hooks = {}
    for name in modules:
        module = importlib.import_module(name)
        hooks.update({cls.default_conn_name: cls for _, cls in inspect.getmembers(module, inspect.isclass)
                      if issubclass(cls, HttpHook) and cls.__module__ == name})
    assert sorted(hooks) == ["binance_archive", "binance_default"]
    assert {cls.conn_type for cls in hooks.values()} == {"http"}
