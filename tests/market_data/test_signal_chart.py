"""The signal chart: a real, reproducible PNG that shows nothing after the signal's cutoff."""

from __future__ import annotations

import pandas as pd
import pytest

from include.market_data.signal_chart import chart_figure, render_chart, render_chart_bytes
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


LONG_REASON = "; ".join(
    f"{interval}: newest candle closed {hours} h ago (expected the candle opening 2024-03-01T11:00:00Z, "
    f"found one opening 2024-02-29T{hours:02d}:00:00Z)"
    for interval, hours in (("1d", 3), ("4h", 5), ("1h", 7))
)


def _drawn_texts(figure):
    """Every non-empty text the figure draws: titles, annotations, labels and the ticks in view."""
    texts = [text for text in figure.findobj(lambda artist: artist.__class__.__name__ in ("Text", "Annotation"))
             if text.get_visible() and text.get_text()]
    not_drawn = set()  # labels of ticks outside the view limits: matplotlib does not draw them
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = (high - low) * 1e-9
            for ticks, locations in ((axis.get_major_ticks(), axis.get_majorticklocs()),
                                     (axis.get_minor_ticks(), axis.get_minorticklocs())):
                for tick, location in zip(ticks, locations):
                    if not low - slack <= location <= high + slack:
                        not_drawn.update({id(tick.label1), id(tick.label2)})
    return [text for text in texts if id(text) not in not_drawn]


def test_stale_chart_title_shows_date_symbol_and_status_and_the_long_reason_fits(up_market):
    import textwrap

    frames, signal = up_market
    stale = stale_signal(
        symbol=SYMBOL, reason=LONG_REASON, lags={"1d": 10800.0, "4h": 18000.0, "1h": 25200.0},
        inputs=signal["inputs"],
    )
    assert len(LONG_REASON) > 300
    figure = chart_figure(frames["1h"], stale)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (axes,) = figure.axes

    title = axes.get_title()
    date = pd.Timestamp(stale["as_of"]).ceil("min").strftime("%Y-%m-%d %H:%M")
    assert SYMBOL in title and date in title and "stale_data" in title
    assert LONG_REASON not in title

    # The reason is drawn in full, wrapped, between the title and the plot.
    (reason,) = [text for text in axes.texts if "newest candle closed" in text.get_text()]
    lines = reason.get_text().split("\n")
    assert len(lines) > 1 and " ".join(lines) == LONG_REASON
    assert lines == textwrap.wrap(LONG_REASON, width=max(map(len, lines)), break_on_hyphens=False)
    title_box = axes.title.get_window_extent(renderer)
    reason_box = reason.get_window_extent(renderer)
    axes_box = axes.get_window_extent(renderer)
    assert axes_box.y1 <= reason_box.y0 and reason_box.y1 <= title_box.y0  # stacked, not overlapping

    figure_box = figure.bbox
    texts = _drawn_texts(figure)
    assert axes.title in texts and reason in texts
    for text in texts:
        box = text.get_window_extent(renderer)
        assert (box.x0 >= figure_box.x0 and box.x1 <= figure_box.x1
                and box.y0 >= figure_box.y0 and box.y1 <= figure_box.y1), (text.get_text(), box)
    tight = figure.get_tightbbox(renderer)  # in inches: everything the figure draws
    assert tight.x0 >= 0 and tight.y0 >= 0
    assert tight.x1 <= figure.get_figwidth() and tight.y1 <= figure.get_figheight()


def test_stale_chart_cuts_a_very_long_reason_short(up_market):
    frames, signal = up_market
    stale = stale_signal(symbol=SYMBOL, reason=LONG_REASON * 5, lags={"1h": 1.0}, inputs=signal["inputs"])
    figure = chart_figure(frames["1h"], stale)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (reason,) = [text for text in figure.axes[0].texts if "newest candle closed" in text.get_text()]
    assert reason.get_text().endswith(" ...") and reason.get_text().count("\n") < 6
    for text in _drawn_texts(figure):
        box = text.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= figure.bbox.x1 and 0 <= box.y0 and box.y1 <= figure.bbox.y1


def test_chart_figure_is_the_figure_the_png_is_made_of(up_market):
    import io

    import matplotlib.style

    frames, signal = up_market
    for chart_signal in (signal, stale_signal(symbol=SYMBOL, reason=LONG_REASON, lags={"1h": 1.0},
                                              inputs=signal["inputs"])):
        buffer = io.BytesIO()
        with matplotlib.style.context("default"):
            chart_figure(frames["1h"], chart_signal).savefig(buffer, format="png", dpi=100,
                                                             metadata={"Software": None})
        assert buffer.getvalue() == render_chart_bytes(frames["1h"], chart_signal)
