"""The report as one self-contained HTML page (CSS bars, inline SVG): no scripts, fonts or fetches, so it
opens the same offline, in a mail client or an archive."""

from __future__ import annotations

from typing import Any

from runner.observe.quality import bars_svg, confusion_svg, esc, voting_line
from runner.observe.report import REPAIRED_MEANS, Report, Section
from runner.observe.summary import Quality, Summary

STYLE = """
body{font-family:sans-serif;margin:2em;max-width:64em;color:#222}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right;vertical-align:top}
td:first-child,th:first-child{text-align:left}
dl.head{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dl.head dt{color:#666}dl.head dd{margin:0}
.cols{display:flex;align-items:flex-end;gap:1px;height:120px;border-bottom:1px solid #888;border-left:1px solid #888}
.cols div{flex:1;background:#1f77b4;min-width:2px}.cols.flight div{background:#9467bd}.cols.lat div{background:#2ca02c}
.axis{display:flex;justify-content:space-between;color:#666;font-size:12px}
.chart{margin:0 0 1em 0}.chart b{font-weight:normal;color:#666;font-size:13px}
.hbar{display:grid;grid-template-columns:12em 1fr;gap:4px 8px;align-items:center}
.hbar span.bar{display:inline-block;height:16px;background:#d62728;vertical-align:middle}
.hbar span.n{margin-left:6px}
td.text{text-align:left;max-width:36em;white-space:pre-wrap}td.bad{color:#b00}
.note{color:#555;font-size:14px}
"""


# In the head of every page: `report --html` replaces a file carrying it without --force (glm-batch wrote it).
HTML_MARK = '<meta name="generator" content="glm-batch report">'


def html_page(found: Report) -> str:
    """The whole page for a report."""
    run = found.run
    parts = [
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{HTML_MARK}'
        f"<title>glm-batch report: {esc(found.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>glm-batch report: {esc(found.name)}</h1>",
        _header(found),
        _timeline(run["timeline"], run, found.summary),
        _latency(run["latency"]),
        _errors(run["errors"]),
        _tiers(run),
        _attempts(run, found.summary.retries),
    ]
    if found.cascade is not None:
        parts.append(_cascade(found.cascade))
    if found.quality is not None:
        parts.append(_quality(found))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _header(found: Report) -> str:
    run = found.run
    tokens = run["tokens"]
    cost = "no prices for this model" if run["cost"] is None else f"{run['cost']:.6f} {run['currency'] or ''}"
    wall = found.summary
    items = [
        ("model", f"{run['model'] or '-'}" + (f" on {run['endpoint']}" if run["endpoint"] else "")),
        (
            "run id",
            f"{run['run_id'] or '-'}" + (f" (and {len(run['runs']) - 1} earlier)" if len(run["runs"]) > 1 else ""),
        ),
        ("date", run["date"] or "-"),
        ("rows", f"{run['rows']:,}: " + ", ".join(f"{n:,} {s}" for s, n in run["by_status"].items())),
        ("rows sharing a prompt", f"{run['rows_reused']:,} (answered by an identical row's request, paid once)"),
        (
            "tokens",
            f"{tokens['input']:,} in / {tokens['output']:,} out"
            + (f" ({tokens['thinking']:,} of them thinking)" if tokens["thinking"] else "")
            + (f"; {tokens['cache_read']:,} cached in" if tokens["cache_read"] else ""),
        ),
        ("cost", cost),
    ]
    if wall.elapsed_s is not None:
        items.append(("last run's wall time", f"{wall.elapsed_s:.1f} s, {wall.requests_per_s} req/s"))
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return f'<dl class="head" id="header">{rows}</dl>'


def _columns(css_id: str, values: list[float], kind: str, unit: str, left: str, right: str) -> str:
    """A column chart of CSS bars, the tallest full height; hovering a bar gives its value."""
    top = max([*values, 1e-9])
    bars = "".join(f'<div style="height:{100 * v / top:.1f}%" title="{v:g} {esc(unit)}"></div>' for v in values)
    return (
        f'<div class="chart"><b>{esc(unit)}: up to {top:,.1f}</b>'
        f'<div class="cols {kind}" id="{css_id}">{bars}</div>'
        f'<div class="axis"><span>{esc(left)}</span><span>{esc(right)}</span></div></div>'
    )


def _timeline(line: dict[str, Any], run: dict[str, Any], summary: Summary) -> str:
    head = "<h2>Throughput and concurrency over time</h2>"
    last = summary.run_id
    idle = ""
    if last and last != run["run_id"] and not summary.requests_queued:
        idle = (
            f'<p class="note" id="idle-run">The last run ({esc(last)}) sent nothing: every row was answered '
            "before. Shown below: the last run that sent.</p>"
        )
    if not line["throughput"]:
        untimed = (
            '<p class="note" id="no-timeline">No request in this output was timed: nothing was sent for it '
            "(answers reused, rows skipped or failed before sending).</p>"
        )
        return head + idle + untimed
    span = line["bin_s"] * len(line["throughput"])
    return (
        head
        + idle
        + f'<p class="note">The latest run that sent ({esc(run["run_id"])}), in {len(line["throughput"])} slices of '
        f"{line['bin_s']:.2f} s; each request counts as in flight from its finish time minus its latency "
        "(for a sampled job, each row stands for its winning sample).</p>"
        + _columns("throughput", line["throughput"], "", "rows finished a second", "0 s", f"{span:.1f} s")
        + _columns("concurrency", line["concurrency"], "flight", "requests in flight (mean)", "0 s", f"{span:.1f} s")
    )


def _latency(lat: dict[str, Any]) -> str:
    head = "<h2>Latency</h2>"
    if not lat["counts"]:
        return head + '<p class="note">No answered requests.</p>'
    percentiles = ", ".join(f"p{q} {lat[f'p{q}']:,.0f} ms" for q in (50, 90, 99))
    return (
        head
        + f'<p id="latency-percentiles">{percentiles} (requests answered ok; retries and repair turns included).</p>'
        + _columns(
            "latency", [float(n) for n in lat["counts"]], "lat", "requests", "0 ms", f"{lat['edges_ms'][-1]:,.0f} ms"
        )
    )


def _hbars(css_id: str, counts: dict[str, Any], colour: str = "#d62728") -> str:
    """Horizontal CSS bars, one labelled line per count, the longest 100%."""
    top = max([*counts.values(), 1])
    lines = "".join(
        f'<span>{esc(label)}</span><span><span class="bar" style="width:{80 * n / top:.1f}%;background:{colour}">'
        f'</span><span class="n">{n:,}</span></span>'
        for label, n in counts.items()
    )
    return f'<div class="hbar" id="{css_id}">{lines}</div>'


def _errors(errors: dict[str, int]) -> str:
    head = "<h2>Errors by type</h2>"
    if not errors:
        return head + '<p id="errors" class="note">No row ended in an error.</p>'
    return head + _hbars("errors", errors)


def _tiers(run: dict[str, Any]) -> str:
    currency = esc(run["currency"] or "")
    rows = "".join(
        f"<tr><td>{esc(tier)}</td><td>{t['requests']:,}</td><td>{t['input_tokens']:,}</td><td>{t['output_tokens']:,}</td>"
        f"<td>{t['cost']:.6f}</td></tr>"
        for tier, t in run["tiers"].items()
    )
    return (
        "<h2>Tokens and cost by price tier</h2>"
        f'<table id="tiers"><tr><th>tier</th><th>requests</th><th>input tokens</th><th>output tokens</th>'
        f"<th>cost {currency}</th></tr>{rows}</table>"
        '<p class="note">A tier is named by its bounds: <code>in&lt;32000,out&lt;200</code> holds requests with '
        "under 32,000 input tokens and answers under 200 tokens (bigmodel.cn prices by both).</p>"
    )


def _attempts(run: dict[str, Any], retried: dict[str, int]) -> str:
    retries = "".join(f"<tr><td>{esc(k)}</td><td>{v:,}</td></tr>" for k, v in retried.items())
    return (
        "<h2>Attempts and retries</h2>"
        '<p class="note">Rows by how many times their request was sent: retries and repair turns count, and for '
        "a sampled job every sample's (so 3 samples answered at once make 3 attempts).</p>"
        + _hbars(
            "attempts", {f"{k} attempt{'s' if k != '1' else ''}": n for k, n in run["attempts"].items()}, "#ff7f0e"
        )
        + (
            f'<p>Retries in the last run, by reason:</p><table id="retries"><tr><th>reason</th><th>retries</th></tr>'
            f"{retries}</table>"
            if retries
            else '<p class="note">The last run retried nothing.</p>'
        )
    )


def _cascade(c: Section) -> str:
    """The cascade's section: the text report's lines (the same words from the same record), and who
    answered the rows drawn as bars."""
    lines = "".join(f"<li>{esc(line)}</li>" for line in c.lines)
    return f'<h2>Cascade</h2><ul id="cascade">{lines}</ul>' + _hbars("cascade-rows", c.bars, "#1f77b4")


def _quality(found: Report) -> str:
    quality = found.quality or Quality()
    metrics = quality.metrics
    parts = ["<h2>Quality</h2>"]
    if metrics is not None and metrics.accuracy is not None:
        parts.append(
            f'<p id="headline">accuracy <b>{metrics.accuracy:.4f}</b> on {metrics.rows_with_gold} rows with a '
            f"gold label; invalid answers {100 * (metrics.invalid_rate or 0):.2f}%; answers repaired "
            f"{quality.repaired}; truncated {quality.truncated}.</p>"
        )
    else:
        parts.append(
            f'<p id="headline">{quality.valid:,} of {quality.rows:,} answers valid, {quality.invalid:,} '
            f"invalid ({quality.truncated:,} truncated); answers repaired {quality.repaired:,}.</p>"
        )
    parts.append(
        f'<p class="note" id="repaired">{esc(REPAIRED_MEANS)}. Of the {found.run["repaired"]:,} rows repaired, '
        f"{found.run['repaired_valid']:,} ended valid.</p>"
    )
    for note in metrics.gold_notes if metrics else ():
        parts.append(f'<p class="note gold-note">{esc(note)}</p>')
    if quality.voting is not None:
        parts.append(f'<p id="voting">{esc(voting_line(quality.voting))}.</p>')
    rates = quality.field_exact_match or {}
    if rates:
        shown = {f: round(100 * r.exact_match, 1) for f, r in rates.items() if r.exact_match is not None}
        parts.append("<h3>Exact match per field</h3>" + _hbars("fields", shown, "#2ca02c"))
        parts.append('<p class="note">Percent of rows with a gold value whose answer equals it (as text).</p>')
    if metrics is not None:
        per_label = "".join(
            f"<tr><td>{esc(label)}</td><td>{m.precision:.3f}</td><td>{m.recall:.3f}</td><td>{m.f1:.3f}</td>"
            f"<td>{m.support}</td></tr>"
            for label, m in metrics.per_label.items()
        )
        parts += [
            '<h3>Per label</h3><table id="per-label"><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th>'
            f"<th>support</th></tr>{per_label}</table>",
            "<h3>Confusion matrix</h3>" + confusion_svg(metrics),
            "<h3>Predicted labels</h3>" + bars_svg("distribution", metrics.predicted_distribution, "rgb(255,127,14)"),
        ]
    if quality.voting is not None:
        parts.append(
            "<h3>Samples agreeing with the vote</h3>"
            + bars_svg("agreement", quality.voting.agreement_distribution, "rgb(44,160,44)")
        )
    if metrics is None and not rates:
        parts.append('<p class="note">No gold labels: set eval.gold_column or eval.gold_fields to score answers.</p>')
    parts.append(_examples(found))
    return "\n".join(parts)


def _examples(found: Report) -> str:
    examples = found.examples
    if examples is None:
        return ""
    head = f"<h3>Wrong answers ({examples['total']:,})</h3>"
    if not examples["total"]:
        return head + '<p class="note">Every answer matched its gold value.</p>'
    note = (
        f"The first {len(examples['rows'])} of {examples['total']:,}, with the input columns the output kept."
        if examples["context"]
        else "The output kept no input columns, so the text is not here: add the template's columns to "
        "output.keep_columns to see it."
    )
    header = [examples["id_column"], *examples["context"]]
    for answer, gold in examples["pairs"].items():
        header += [answer, gold]
    has_agreement = any("agreement" in row for row in examples["rows"][:1])
    header += ["status"] + (["agreement"] if has_agreement else [])
    lines = []
    for row in examples["rows"]:
        cells = [f"<td>{esc(row[examples['id_column']])}</td>"]
        cells += [f'<td class="text">{esc(row[c])}</td>' for c in examples["context"]]
        for answer, gold in examples["pairs"].items():
            given = row[answer] if row["status"] == "ok" else f"({row['status']}: {row['error_type']})"
            cells += [f'<td class="bad">{esc(given)}</td>', f"<td>{esc(row[gold])}</td>"]
        cells.append(f"<td>{esc(row['status'])}</td>")
        if has_agreement:
            cells.append(f"<td>{esc(row['agreement'])}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    titles = "".join(f"<th>{esc(h)}</th>" for h in header)
    return head + f'<p class="note">{esc(note)}</p><table id="wrong"><tr>{titles}</tr>{"".join(lines)}</table>'
