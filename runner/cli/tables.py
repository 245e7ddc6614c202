"""The tables the commands print, from plain data: fit to an 80-column terminal, wrapped, never cut off."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runner.observe.progress import pairs_table

if TYPE_CHECKING:
    import polars as pl
    from rich.table import Table


def _grid(title: str | None = None, *, header: bool = True) -> Table:
    """A table drawn to fit narrow terminals: no side borders and one space of padding per cell."""
    from rich import box
    from rich.table import Table

    return Table(title=title, show_header=header, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)


def _estimate_table(r: dict[str, Any]) -> Table:
    """The estimate report as a label / value table."""
    if r.get("cascade") is not None:
        return _cascade_table(r)
    cur = r["currency"]
    cost = r["cost"]
    tokens_in = r["input_tokens"]
    tokens_out = r["output_tokens"]
    wall = r["wall_time_s"]
    rows = [
        ("rows", f"{r['rows']:,} ({r['rows_answered_already']:,} already answered)"),
        ("requests to send", f"{r['requests_to_send']:,}"),
        *(
            [("rows failing to render", f"{r['render_failures']['rows']:,}; first: {r['render_failures']['first']}")]
            if r["render_failures"]["rows"]
            else []
        ),
        *(
            [
                (
                    "over the context window",
                    f"{r['over_context']['requests']:,} requests estimated above "
                    f"{r['over_context']['context_tokens']:,} input tokens: the endpoint refuses them "
                    "(1261, not billed); shorten those prompts",
                )
            ]
            if r["over_context"]["requests"]
            else []
        ),
        (
            "input tokens",
            f"{tokens_in['expected']:,} (calibration x{tokens_in['calibration']['ratio']}: "
            f"{tokens_in['calibration']['basis']})",
        ),
        (
            "output tokens",
            f"{tokens_out['low']:,} / {tokens_out['expected']:,} / {tokens_out['high']:,} "
            f"(low / expected / high; ceiling {tokens_out['ceiling']:,})",
        ),
        ("", tokens_out["basis"]),
        (
            "cost",
            f"{cost['low']:.4f} / {cost['expected']:.4f} / {cost['high']:.4f} {cur} (ceiling {cost['ceiling']:.4f})",
        ),
        *_mode_rows(r.get("modes", {}), cur),
        ("price tiers", ", ".join(f"{k}: {v:,}" for k, v in r["tier_mix"].items()) or "-"),
        (
            "wall time",
            f"{wall['expected']:,.0f} s at concurrency {wall['concurrency']}, "
            f"{wall['latency_s_per_request']} s a request ({wall['latency_basis']})",
        ),
    ]
    if not r["prices_confirmed"]:
        rows.append(("note", f"the {cur} prices of {r['model']} are not confirmed (configs/models.yaml)"))
    return pairs_table(f"estimate: {r['job']} ({r['model']} on {r['endpoint']})", rows)


def _cascade_table(r: dict[str, Any]) -> Table:
    """A cascade job's estimate: its next run per stage, then the whole cascade against the oracle alone."""
    c, cur = r["cascade"], r["currency"]
    run, cost, only, share = c["next_run"], c["cost"], c["oracle_only_cost"], c["share_of_oracle_only"]
    asks = run["oracle_requests"]
    pct = {k: "-" if v is None else f"{v:.0%}" for k, v in share.items()}
    oracle_asks = (
        f"{asks['expected']:,}"
        if asks["low"] == asks["high"]
        else f"{asks['low']:,} / {asks['expected']:,} / {asks['high']:,} (low / expected / high)"
    )
    rows = [
        ("rows", f"{r['rows']:,} ({r['rows_answered_already']:,} already answered)"),
        ("requests to send", f"{c['proxy']}: {run['proxy_requests']:,}; {c['oracle']}: {oracle_asks} ({run['basis']})"),
        ("cost", f"{r['cost']['low']:.4f} / {r['cost']['expected']:.4f} / {r['cost']['high']:.4f} {cur} "
                 f"(low / expected / high; ceiling {r['cost']['ceiling']:.4f})"),
        *([("rows failing to render", f"{r['render_failures']['rows']:,}; first: {r['render_failures']['first']}")]
          if r["render_failures"]["rows"] else []),
        ("cascade", f"{c['proxy']} answers every row ({c['proxy_requests']:,} requests, "
                    f"{c['proxy_cost']['expected']:.4f} {cur}); {c['oracle']} the rest; {c['guarantee']}"),
        ("whole cascade", f"{cost['low']:.4f} / {cost['expected']:.4f} / {cost['high']:.4f} {cur} (low / expected / "
                          f"high, answered before or not)"),
        ("oracle only", f"{only['low']:.4f} / {only['expected']:.4f} / {only['high']:.4f} {cur}: the cascade is "
                        f"{pct['low']} / {pct['expected']} / {pct['high']} of it, each on the same basis"),
        ("", f"oracle answers {c['oracle_share']['low']:.0%} / {c['oracle_share']['expected']:.0%} / 100% of rows; "
             f"low: a proxy that always agrees (calibration only); high: a useless proxy; "
             f"expected: {c['oracle_share']['basis']}"),
    ]  # fmt: skip
    if not r["prices_confirmed"]:
        rows.append(
            ("note", f"the {cur} prices of {c['proxy']} or {c['oracle']} are not confirmed (configs/models.yaml)")
        )
    return pairs_table(f"estimate: {r['job']} (cascade, {c['oracle']} on {r['endpoint']})", rows)


def _mode_rows(modes: dict[str, Any], cur: str) -> list[tuple[str, str]]:
    """Online, batch and hybrid side by side: expected cost and wall time of each."""
    rows = []
    refused_shown = False  # hybrid is refused for batch's reason: say it once, on the batch row
    for mode in ("online", "batch", "hybrid"):
        m = modes.get(mode)
        if not m:
            continue
        if m.get("eligible") is False:
            why = m.get("why") or "the Batch API does not take this model"
            rows.append((f"{mode} mode", "not available (see batch)" if refused_shown else f"not available: {why}"))
            refused_shown = True
            continue
        low, high = m.get("cost_range", [m.get("cost"), m.get("cost")])
        cost = f"{m['cost']:.4f} {cur}" if "cost" in m else f"{low:.4f} to {high:.4f} {cur}"
        wall = f", {m['wall_time_s']:,.0f} s" if "wall_time_s" in m else ""
        basis = f" ({m['basis']})" if m.get("basis") else ""
        rows.append((f"{mode} mode", f"{cost}{wall}{basis}"))
    return rows


def _compact(n: int) -> str:
    """A count in at most four or five characters: 9,999 / 12.3k / 123k / 1.23M / 4.56G."""
    if n < 10_000:
        return f"{n:,}"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 1000 else f"{value:,.0f}{unit}"
    return str(n)  # unreachable: n >= 10,000 matched "k"


def _usage_table(summary: pl.DataFrame, keys: list[str], width: int = 80) -> Table:
    """Ledger totals as a table that fits `width` columns: exact counts when they fit, else compact ones
    (12.3k, 1.23M) and a caption pointing to --json; failed and cached columns only when some row has any."""
    numeric = {"runs": "runs", "ok": "requests ok", "tokens_in": "tokens in", "tokens_out": "tokens out"}
    if summary.get_column("failed").sum():
        numeric = {**numeric, "failed": "failed"}
    if summary.get_column("cached_in").sum():
        numeric = {**numeric, "cached_in": "cached in"}

    def build(count: Callable[[int], str]) -> tuple[Table, bool]:
        """The table, and whether every figure fits on one line."""
        rows = [
            [*(str(row[k]) for k in keys), *(count(row[c]) for c in numeric), f"{row['cost']:g} {row['currency']}"]
            for row in summary.iter_rows(named=True)
        ]
        table = _grid(f"usage by {', '.join(keys)}")
        for key in keys:
            table.add_column(key, overflow="fold")
        for header in numeric.values():
            table.add_column(header, justify="right", overflow="fold")
        table.add_column("cost", justify="right", overflow="fold")
        for cells in rows:
            table.add_row(*cells)
        # Keep values on one line while that fits (headers wrap instead), figures first, job names last; the
        # columns left over fold into what remains. A fixed width is the one rich will not shrink; a
        # column costs its content, one space of padding and one of border.
        n = len(table.columns)
        used = 6 * n + 1  # every column at a foldable 4 characters, plus the table's edges
        for i in sorted(range(n), key=lambda i: (i < len(keys), i < len(keys) and keys[i] == "job", i)):
            column = table.columns[i]
            header_words = [len(w) for w in str(column.header).split()]
            cells = [w for r in rows for w in r[i].split()] if i == n - 1 else [r[i] for r in rows]
            need = max([len(c) for c in cells] + header_words)  # the cost may wrap between figure and currency
            if used - 4 + need <= width:
                column.width = need
                used += need - 4
        return table, all(c.width is not None for c in table.columns[len(keys) :])

    exact, figures_fit = build(lambda n: f"{n:,}")
    if figures_fit:
        return exact
    compact, _ = build(_compact)
    compact.caption = "k = thousand, M = million; glm-batch usage --json has the exact figures"
    return compact


def _thousands(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _tier_bounds(tier: dict[str, Any]) -> str:
    bounds = [
        f"{side}<{_thousands(tier[key])}"
        for side, key in (("in", "max_input_tokens"), ("out", "max_output_tokens"))
        if tier.get(key) is not None
    ]
    return ",".join(bounds)


def _models_table(catalogue: dict[str, dict[str, Any]]) -> Table:
    """The catalogue, one line per model, currency and price tier, narrow enough for 80 columns."""
    table = _grid("GLM models (configs/models.yaml)")
    table.add_column("model", no_wrap=True)
    table.add_column("context", justify="right")
    table.add_column("max out", justify="right")
    table.add_column("conc", justify="right")
    table.add_column("batch")  # taken by Zhipu's Batch API (run.mode: batch / hybrid)
    table.add_column("cur")
    table.add_column("in/cached/out per 1M tokens", overflow="fold")
    table.add_column("confirmed")
    for name, info in catalogue.items():
        batch = "yes" if (info.get("batch") or {}).get("eligible") else "no"
        lead = [name, str(info["context"]), str(info["max_output"]), str(info["concurrency"]), batch]
        if not info["prices"]:
            table.add_row(*lead, "-", "no prices in the catalogue", "")
        for currency, prices in info["prices"].items():
            for i, tier in enumerate(prices["tiers"]):
                price = f"{tier['input']:g}/{tier['cached_input']:g}/{tier['output']:g}"
                bounds = _tier_bounds(tier)
                table.add_row(
                    *lead,
                    currency if i == 0 else "",
                    f"{price} {bounds}" if bounds else price,
                    ("yes" if prices["confirmed"] else "no") if i == 0 else "",
                )
                lead = ["", "", "", "", ""]
    return table
