"""Drawing the run's figure (`plot.PlotData`) with matplotlib's Agg canvas: no display, and none under a service.

matplotlib is the optional extra `trainctl[plot]`; it is imported inside `render` only, so that importing this
module (or the supervisor) never needs it.
"""
from __future__ import annotations

import io

from trainctl.contract.runfolder import is_finite_number

from .plot import INSTALL, PlotData, PlotUnavailable, headline
from .text import duration

TIME_KINDS = {"start-up": "0.72", "training": "tab:green", "re-done": "tab:orange", "restart": "tab:red"}
TIME_LABELS = {"start-up": "start-up", "training": "training (kept)", "re-done": "training lost to a crash (re-done)",
               "restart": "restart (backoff, boot)"}
CURVE, VAL, CRASH, RUNG, REDONE, DISCARDED = "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "0.45"
MORE_VAL = ("tab:olive", "tab:cyan", "tab:brown", "tab:pink")   # top-5, EMA...: not the curve's blue
NOT_VALUES = frozenset({"kind", "step", "epoch", "time", "attempt", "rung", "nonfinite_steps"})


def render(data: PlotData) -> bytes:
    """The figure as PNG bytes, drawn with matplotlib's Agg canvas (no display: none under a service)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotUnavailable(f"drawing the run needs matplotlib, which is not installed ({e}). Fix: {INSTALL}") from e
    fig = Figure(figsize=(11, 13), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(5, 1, height_ratios=[3, 2.2, 1.1, 1.1, 1.0])
    loss = fig.add_subplot(grid[0])
    panels = [loss] + [fig.add_subplot(grid[i], sharex=loss) for i in (1, 2, 3)]
    draw_title(fig, data)
    draw_loss(loss, data)
    draw_accuracy(panels[1], data)
    draw_metric(panels[2], data, "lr", "learning rate")
    draw_metric(panels[3], data, "images_per_sec", "images/s")
    for ax in panels:
        mark(ax, data, labelled=ax is loss)
        ax.grid(alpha=0.3)
        if ax is not panels[-1]:
            ax.tick_params(labelbottom=False)
    panels[-1].set_xlabel("optimizer step")
    loss.set_xlim(0, max([data.total_steps or 0, *(m["step"] for m in data.train + data.discarded)]) or 1)
    draw_time(fig.add_subplot(grid[4]), data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def draw_title(fig, data: PlotData) -> None:
    fig.suptitle(f"{data.run_name} — {data.state.upper()}\n{headline(data)}", fontsize=12)


def draw_loss(ax, data: PlotData) -> None:
    ax.plot(*series(data.train, "loss"), color=CURVE, lw=1.6, label="training loss (the run's curve)")
    draw_discarded(ax, data.discarded, "loss", "discarded: trained, lost in a crash, re-done")
    steps, values = series(data.val, "val_loss")
    if steps:
        ax.plot(steps, values, color=VAL, marker="o", ms=4, lw=1, label="validation loss")
    if not data.train:
        ax.text(0.5, 0.5, "no training step logged yet", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_ylabel("loss")
    legend(ax, data)


def draw_accuracy(ax, data: PlotData) -> None:
    ax.plot(*series(data.train, "acc"), color=CURVE, lw=1, alpha=0.6, label="training accuracy")
    draw_discarded(ax, data.discarded, "acc", None)
    for i, key in enumerate(value_keys(data.val, exclude="loss")):
        ax.plot(*series(data.val, key), marker="o", ms=4, lw=1.4, label=val_label(key),
                color=VAL if key == "val_acc" else MORE_VAL[i % len(MORE_VAL)])
        draw_discarded(ax, data.discarded_val, key, None)
    ax.set_ylabel("accuracy")
    if ax.lines:
        ax.legend(loc="lower right", fontsize=8)


def draw_metric(ax, data: PlotData, key: str, label: str) -> None:
    ax.plot(*series(data.train, key), color=CURVE, lw=1.3)
    draw_discarded(ax, data.discarded, key, None)
    ax.set_ylabel(label)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))


def draw_discarded(ax, lines: list[dict], key: str, label: str | None) -> None:
    """Each attempt's discarded lines as its own faint dotted piece (pieces of two attempts are not joined)."""
    for attempt in sorted({m.get("attempt") or 0 for m in lines}):
        steps, values = series([m for m in lines if (m.get("attempt") or 0) == attempt], key)
        if steps:
            ax.plot(steps, values, color=DISCARDED, ls=":", marker="x", ms=4, lw=1, label=label)
            label = None   # one legend entry


def mark(ax, data: PlotData, labelled: bool) -> None:
    """Shaded re-done spans, a dashed line at each crash, a dash-dot line at each rung change."""
    at_top = ax.get_xaxis_transform()   # x in steps, y in axes fractions
    for r in data.redone:
        ax.axvspan(r.first, r.last, color=REDONE, alpha=0.18, lw=0)
    for c in data.crashes:
        ax.axvline(c.step, color=CRASH, ls="--", lw=1.2)
        if labelled:
            ax.text(c.step, 1.01, f"{c.kind} (attempt {c.attempt})", transform=at_top, color=CRASH, fontsize=8.5,
                    ha="center", va="bottom", weight="bold")
    for rc in data.rung_changes:
        ax.axvline(rc.step, color=RUNG, ls="-.", lw=1.2)
        if labelled:
            ax.text(rc.step, 0.03, f" rung {rc.from_rung} → {rc.to_rung}: {rc.rung} ", transform=at_top, color=RUNG,
                    fontsize=8, rotation=90, ha="right", va="bottom")


def legend(ax, data: PlotData) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles, _ = ax.get_legend_handles_labels()
    if data.redone:
        handles.append(Patch(color=REDONE, alpha=0.3, label="span trained again after a crash"))
    if data.crashes:
        handles.append(Line2D([], [], color=CRASH, ls="--", label="crash (its kind above)"))
    if data.rung_changes:
        handles.append(Line2D([], [], color=RUNG, ls="-.", label="rung change"))
    ax.legend(handles=handles, loc="best", fontsize=8)


def draw_time(ax, data: PlotData) -> None:
    """The supervised wall-clock time: what each stretch of it went to, crashes marked, unsupervised gaps noted."""
    end = max([s.end for s in data.timeline] or [0.0])
    unit, per = ("hours", 3600.0) if end > 3 * 3600 else ("minutes", 60.0) if end > 120 else ("seconds", 1.0)
    for kind, colour in TIME_KINDS.items():
        bars = [(s.start / per, (s.end - s.start) / per) for s in data.timeline if s.kind == kind]
        if bars:
            ax.broken_barh(bars, (0, 1), facecolors=colour, label=TIME_LABELS[kind])
    for c in data.crashes:
        ax.axvline(c.at / per, color=CRASH, ls="--", lw=1.2)
        ax.text(c.at / per, 1.04, c.kind, color=CRASH, fontsize=8, ha="center", va="bottom")
    for g in data.gaps:
        ax.axvline(g.at / per, color="black", lw=2)
        ax.text(g.at / per, 0.5, f" no supervisor for {duration(g.seconds)} ", fontsize=8, ha="left", va="center",
                bbox={"facecolor": "white", "alpha": 0.85, "lw": 0})   # not beside a crash label (a crash often ends a life)
    ax.set_ylim(0, 1.35)
    ax.set_yticks([])
    ax.set_xlim(0, end / per or 1)
    ax.set_xlabel(f"supervised wall-clock time ({unit}; time no supervisor ran is left out)")
    ax.set_title("where the time went", fontsize=10, loc="left")
    if data.timeline:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=8, frameon=False)


def series(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, leaving out lines where it is missing or not a finite number."""
    pairs = [(m["step"], m[key]) for m in lines if is_finite_number(m.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def value_keys(lines: list[dict], exclude: str) -> list[str]:
    """The numeric fields of validation lines (val_acc first, then top-5, EMA... as the worker writes them)."""
    keys = {k for m in lines for k, v in m.items() if k not in NOT_VALUES and exclude not in k and is_finite_number(v)}
    return sorted(keys, key=lambda k: (k != "val_acc", k))


def val_label(key: str) -> str:
    return {"val_acc": "validation top-1", "val_top5": "validation top-5"}.get(key, key.replace("_", " "))
