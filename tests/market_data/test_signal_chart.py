"""The signal chart: a real, reproducible PNG that shows nothing after the signal's cutoff."""

from __future__ import annotations

import pandas as pd
import pytest

from include.market_data.signal_chart import render_chart, render_chart_bytes
from include.market_data.signal_rule import stale_signal
from tests.market_data.test_signal_rule import CUTOFF, DOWN, PULLBACK, SYMBOL, UP, market, signal_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def up_market():
    frames = market(UP)
    return frames, signal_of(frames)


def test_chart_is_a_1400_by_800_png_of_sensible_size(up_market, tmp_path):
    from matplotlib import image

    frames, signal = up_market
    path = tmp_path / "charts" / "signal_20240301.png"
    render_chart(frames["1h"], signal, path)

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert 10_000 < len(data) < 2_000_000
    height, width = image.imread(path).shape[:2]
    assert (width, height) == (1400, 800)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_same_inputs_give_the_same_bytes(up_market, tmp_path):
    frames, signal = up_market
    render_chart(frames["1h"], signal, tmp_path / "first.png")
    render_chart(frames["1h"].copy(), dict(signal), str(tmp_path / "second.png"))

    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()
    assert (tmp_path / "first.png").read_bytes() == render_chart_bytes(frames["1h"], signal)


def test_candles_after_the_signal_and_before_the_window_are_not_drawn(up_market):
    frames, signal = up_market
    hourly = frames["1h"]
    in_window = hourly[
        (hourly["close_time"] < CUTOFF) & (hourly["open_time"] >= CUTOFF - pd.Timedelta(days=5))
    ]
    assert len(in_window) < len(hourly)

    assert render_chart_bytes(hourly, signal) == render_chart_bytes(in_window, signal)


def test_each_signal_gets_its_own_picture():
    charts = set()
    for knots in (UP, DOWN, PULLBACK):
        frames = market(knots)
        charts.add(render_chart_bytes(frames["1h"], signal_of(frames)))
    assert len(charts) == 3


def test_stale_signal_still_draws_the_candles(up_market, tmp_path):
    frames, signal = up_market
    stale = stale_signal(
        symbol=SYMBOL,
        reason="1h: newest candle closed 3 h ago",
        lags={"1d": 43200.0, "4h": 14400.0, "1h": 10800.0},
        inputs=signal["inputs"],
    )
    path = tmp_path / "stale.png"
    render_chart(frames["1h"], stale, path)

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert data != render_chart_bytes(frames["1h"], signal)


def test_stale_signal_without_any_candle_renders(tmp_path):
    empty = market(UP)["1h"].iloc[0:0]
    stale = stale_signal(symbol=SYMBOL, reason="no 1h data", lags={"1h": None}, inputs={"1h": None})
    path = tmp_path / "empty.png"
    render_chart(empty, stale, path)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_days_must_be_positive(up_market, tmp_path):
    frames, signal = up_market
    with pytest.raises(ValueError, match="days must be at least 1"):
        render_chart(frames["1h"], signal, tmp_path / "x.png", days=0)
