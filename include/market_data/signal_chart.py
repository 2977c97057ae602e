"""The signal's chart: the last days of 1h candles with the levels the rule looked at.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch)
under matplotlib's default style, and saved without a Software tag, so the same frame
and signal give byte-identical PNGs.
"""

from __future__ import annotations

import io
import os
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from include.market_data.timeframes import HOUR_MS

CHART_SIZE_INCHES = (14, 8)
CHART_DPI = 100  # 1400 x 800 px

UP_COLOR = "#26a69a"
DOWN_COLOR = "#ef5350"
TRADE_LINES = (  # signal key, label, colour
    ("entry", "entry", "#1f4e79"),
    ("stop_loss", "stop", "#c62828"),
    ("take_profit", "target", "#2e7d32"),
)
# A stale signal's reason goes under its title, wrapped: at 10 pt, 130 characters stay well
# inside the 14 in wide axes; more than REASON_MAX_LINES lines are cut short with " ...".
REASON_WRAP_CHARS = 130
REASON_MAX_LINES = 4
REASON_FONT_PT = 10
REASON_LINE_PT = REASON_FONT_PT * 1.2  # matplotlib's default line spacing
PIVOT_LINES = (  # column, label, colour, line style
    ("r2", "R2", "#8e24aa", ":"),
    ("r1", "R1", "#8e24aa", "--"),
    ("pivot", "P", "#616161", "--"),
    ("s1", "S1", "#f57c00", "--"),
    ("s2", "S2", "#f57c00", ":"),
)


def render_chart(
    frame_1h: pd.DataFrame, signal: Mapping, path: str | os.PathLike, *, days: int = 5
) -> None:
    """Write the chart of ``signal`` to the local file ``path`` (atomically: temp + rename)."""
    png = render_chart_bytes(frame_1h, signal, days=days)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as temp_file:
            temp_file.write(png)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def render_chart_bytes(frame_1h: pd.DataFrame, signal: Mapping, *, days: int = 5) -> bytes:
    """The PNG bytes of the chart (for object stores, where the caller does the writing).

    Candles are the 1h rows of ``signal["symbol"]`` that closed at or before
    ``signal["as_of"]`` (the newest candle the signal used, so nothing later is shown),
    limited to the last ``days`` days. A stale signal is drawn from whatever rows exist,
    titled with its symbol, date and STALE DATA (its status), the reason wrapped below.
    """
    import matplotlib.style

    with matplotlib.style.context("default"):
        figure = chart_figure(frame_1h, signal, days=days)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=CHART_DPI, metadata={"Software": None})
    return buffer.getvalue()


def chart_figure(frame_1h: pd.DataFrame, signal: Mapping, *, days: int = 5):
    """The chart as a matplotlib ``Figure`` on an Agg canvas (not saved), as :func:`render_chart_bytes` draws it."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    candles = _chart_candles(frame_1h, signal, days)

    # Imported here: the DAG layer must not pay for matplotlib at parse time.
    import matplotlib.dates as mdates
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reason_lines = _reason_lines(signal) if signal.get("status") != "ok" else []
    # The axes give up the room the reason's lines take between the title and the plot.
    reason_height = len(reason_lines) * REASON_LINE_PT / (CHART_SIZE_INCHES[1] * 72)
    with matplotlib.style.context("default"):
        figure = Figure(figsize=CHART_SIZE_INCHES, dpi=CHART_DPI)
        FigureCanvasAgg(figure)
        figure.subplots_adjust(left=0.06, right=0.98, top=0.94 - reason_height, bottom=0.08)
        axes = figure.add_subplot(1, 1, 1)
        _draw(axes, candles, signal, mdates, reason_lines)
    return figure


def _chart_candles(frame_1h: pd.DataFrame, signal: Mapping, days: int) -> pd.DataFrame:
    rows = frame_1h
    if "symbol" in rows.columns and signal.get("symbol"):
        rows = rows[rows["symbol"] == signal["symbol"]]
    rows = rows.assign(
        open_time=pd.to_datetime(rows["open_time"], utc=True),
        close_time=pd.to_datetime(rows["close_time"], utc=True),
    )
    if signal.get("as_of"):
        rows = rows[rows["close_time"] <= pd.Timestamp(signal["as_of"])]
    rows = rows.sort_values("open_time", kind="stable")
    if not rows.empty:
        first_open = rows["close_time"].iloc[-1] - pd.Timedelta(days=days)
        rows = rows[rows["open_time"] >= first_open]
    return rows.reset_index(drop=True)


def _draw(axes, candles: pd.DataFrame, signal: Mapping, mdates, reason_lines: list[str]) -> None:
    stale = signal.get("status") != "ok"
    title_color = "#b71c1c" if stale else "black"
    if reason_lines:
        # Title (symbol, date, status) on top; the wrapped reason between it and the plot.
        gap_pt = 4
        axes.set_title(_title(candles, signal), fontsize=13, color=title_color,
                       pad=6 + gap_pt + len(reason_lines) * REASON_LINE_PT)
        axes.annotate("\n".join(reason_lines), xy=(0.5, 1.0), xycoords="axes fraction",
                      xytext=(0, gap_pt), textcoords="offset points", ha="center", va="bottom",
                      fontsize=REASON_FONT_PT, color=title_color)
    else:
        axes.set_title(_title(candles, signal), fontsize=13, color=title_color)
    axes.grid(True, color="#e0e0e0", linewidth=0.6)
    axes.set_ylabel("price")
    if candles.empty:
        axes.text(0.5, 0.5, "no 1h candles", ha="center", va="center", transform=axes.transAxes)
        return

    width_days = HOUR_MS / 86_400_000
    centers = mdates.date2num((candles["open_time"] + pd.Timedelta(minutes=30)).dt.tz_localize(None))
    opens, closes = candles["open"].to_numpy(float), candles["close"].to_numpy(float)
    highs, lows = candles["high"].to_numpy(float), candles["low"].to_numpy(float)
    colors = np.where(closes >= opens, UP_COLOR, DOWN_COLOR)
    axes.vlines(centers, lows, highs, colors=colors, linewidth=0.8, zorder=2)
    bodies = np.maximum(np.abs(closes - opens), (highs.max() - lows.min()) * 1e-4)
    axes.bar(
        centers, bodies, width=width_days * 0.7, bottom=np.minimum(opens, closes),
        color=colors, edgecolor=colors, linewidth=0.5, zorder=3,
    )
    visible = [lows.min(), highs.max()]

    if "vwap" in candles.columns:
        # The session VWAP restarts at 00:00 UTC: break the line there instead of joining days.
        days_of_rows = candles["open_time"].dt.floor("D").to_numpy()
        vwap = candles["vwap"].to_numpy(float)
        for number, day in enumerate(np.unique(days_of_rows)):
            in_day = days_of_rows == day
            axes.plot(
                centers[in_day], vwap[in_day], color="#1976d2", linewidth=1.4,
                label="session VWAP" if number == 0 else None, zorder=4,
            )

    last = candles.iloc[-1]
    # Room right of the last candle for the trade lines and their labels.
    x_left, x_right = centers[0] - width_days, centers[-1] + width_days * 20
    today_start = mdates.date2num(last["open_time"].floor("D").tz_localize(None))
    for column, label, color, style in PIVOT_LINES:
        level = _finite(last.get(column))
        if level is None:
            continue
        axes.hlines(level, today_start, centers[-1], colors=color, linestyles=style, linewidth=1.0)
        # Labelled at the left end of the line: the right margin belongs to entry/stop/target.
        axes.text(today_start, level, f"{label} {level:.8g}", color=color, va="bottom", fontsize=8)
        if column in ("pivot", "r1", "s1"):
            visible.append(level)
    for column, label, color in (("support", "support", "#795548"), ("resistance", "resistance", "#795548")):
        level = _finite(last.get(column))
        if level is None:
            continue
        axes.hlines(level, centers[0], centers[-1], colors=color, linestyles="-.", linewidth=1.0)
        axes.text(x_left, level, f"{label} {level:.8g} ", color=color, va="bottom", ha="left", fontsize=8)
        visible.append(level)
    if not stale:
        for key, label, color in TRADE_LINES:
            level = _finite(signal.get(key))
            if level is None:
                continue
            axes.hlines(level, centers[-1] - width_days * 6, x_right, colors=color, linewidth=1.8, zorder=5)
            axes.text(centers[-1] + width_days, level, f"{label} {level:.8g}", color=color, va="bottom", fontsize=9,
                      fontweight="bold")
            visible.append(level)

    low, high = min(visible), max(visible)
    margin = (high - low) * 0.05 or abs(high) * 0.01 or 1.0
    axes.set_ylim(low - margin, high + margin)
    axes.set_xlim(x_left, x_right)
    axes.xaxis.set_major_locator(mdates.HourLocator(byhour=(0, 12)))
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    axes.set_xlabel("UTC")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", fontsize=9)


def _title(candles: pd.DataFrame, signal: Mapping) -> str:
    symbol = signal.get("symbol") or "?"
    moment = signal.get("as_of") or (
        candles["close_time"].iloc[-1].isoformat() if not candles.empty else None
    )
    # as_of is a close time (hh:59:59.999): shown as the minute the candle closed.
    date = pd.Timestamp(moment).ceil("min").strftime("%Y-%m-%d %H:%M UTC") if moment else "no data"
    if signal.get("status") != "ok":
        # The reason is drawn under the title (see _draw), so these stay in view.
        if not moment and signal.get("date"):
            date = f"{signal['date']} (no data)"
        return f"{symbol}  {date}  STALE DATA ({signal.get('status') or 'stale_data'})"
    confidence = signal.get("confidence")
    confidence_text = f"{confidence:.2f}" if isinstance(confidence, (int, float)) else "?"
    return f"{symbol}  {date}  {str(signal.get('direction')).upper()}  confidence {confidence_text}"


def _reason_lines(signal: Mapping) -> list[str]:
    """A stale signal's reason wrapped to lines of at most REASON_WRAP_CHARS, REASON_MAX_LINES at most."""
    reason = " ".join(str(signal.get("reason") or "inputs not fresh").split())
    lines = textwrap.wrap(reason, width=REASON_WRAP_CHARS, break_long_words=True, break_on_hyphens=False)
    if len(lines) > REASON_MAX_LINES:
        rest = " ".join(lines[REASON_MAX_LINES - 1:])
        lines = lines[:REASON_MAX_LINES - 1] + [
            textwrap.shorten(rest, width=REASON_WRAP_CHARS, placeholder=" ...")
            if " " in rest[:REASON_WRAP_CHARS] else rest[:REASON_WRAP_CHARS - 4] + " ..."
        ]
    return lines or ["inputs not fresh"]


def _finite(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
