# ruff: noqa: E501  (the HTML template reads better unwrapped)
"""A bill as CSV (one row per line item, for accounting tools) or as a printable HTML statement."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterable
from typing import Any

__all__ = ["CSV_COLUMNS", "bill_html", "bills_csv"]

CSV_COLUMNS = (
    "site",
    "unit",
    "tenant",
    "month",
    "line",
    "kind",
    "description",
    "tariff",
    "effective_from",
    "band",
    "quantity",
    "unit_of_measure",
    "unit_price",
    "amount",
    "currency",
)


def bills_csv(bills: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for bill in bills:
        tenant = bill.get("tenant") or ({"name": "(vacant)"} if bill.get("vacant") else {})
        for k, line in enumerate(bill["lines"], 1):
            w.writerow(
                [
                    bill["site"]["name"],
                    bill["unit"]["name"],
                    tenant.get("name", ""),
                    bill["month"],
                    k,
                    line["kind"],
                    line["description"],
                    line["tariff"] or "",
                    line["effective_from"] or "",
                    line["band"] or "",
                    line["quantity"],
                    line["unit"],
                    line["unit_price"],
                    line["amount"],
                    bill["currency"],
                ]
            )
    return out.getvalue()


def _reading(p: dict[str, Any] | None) -> str:
    if p is None:
        return "no reading"
    mark = {"interpolated": " (interpolated)", "before_first": " (held: no earlier reading)"}
    mark["after_last"] = " (held: no later reading)"
    return f"{p['kwh']} kWh at {p['t_iso'][:16]}{mark.get(p['source'], '')}"


def bill_html(bill: dict[str, Any]) -> str:
    e = html.escape
    tenant = bill.get("tenant")
    rows = "".join(
        f"<tr><td>{e(ln['description'])}</td><td class=n>{e(ln['quantity'])} {e(ln['unit'])}</td>"
        f"<td class=n>{e(ln['unit_price'])}</td><td class=n>{e(ln['amount'])}</td></tr>"
        for ln in bill["lines"]
    )
    meters = "".join(
        f"<tr><td>{e(m['cid'])}</td><td>{e(_reading(m['opening']))}</td><td>{e(_reading(m['closing']))}</td>"
        f"<td class=n>{e(m['kwh'])}</td></tr>"
        for m in bill["meters"]
    )
    warnings = "".join(f"<li>{e(w)}</li>" for w in bill.get("warnings", []))
    cur = e(bill["currency"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Statement {e(bill["unit"]["name"])} {e(bill["month"])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:50rem;margin:1rem auto;padding:0 1rem;color:#111}}
table{{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}}td,th{{border-bottom:1px solid #ccc;padding:.3rem;text-align:left}}
.n{{text-align:right;font-variant-numeric:tabular-nums}}tfoot td{{font-weight:bold}}
@media print{{body{{margin:0}}}}
</style></head><body>
<h1>Electricity statement</h1>
<p><b>{e(bill["site"]["name"])}</b>, unit {e(bill["unit"]["name"])}
{f"<br>Tenant: {e(tenant['name'])}" if tenant else "<br>Vacant (no tenant)" if bill.get("vacant") else ""}
<br>Period: {e(bill["month"])} ({e(bill["start_iso"][:10])} to {e(bill["end_iso"][:10])}, {e(bill["site"]["timezone"])})</p>
<h2>Meter readings</h2>
<table><thead><tr><th>Meter</th><th>Opening</th><th>Closing</th><th class=n>kWh</th></tr></thead>
<tbody>{meters}</tbody></table>
<h2>Charges ({cur})</h2>
<table><thead><tr><th>Item</th><th class=n>Quantity</th><th class=n>Price</th><th class=n>Amount</th></tr></thead>
<tbody>{rows}</tbody>
<tfoot><tr><td colspan=3>Total</td><td class=n>{e(bill["total"])} {cur}</td></tr></tfoot></table>
{f"<ul>{warnings}</ul>" if warnings else ""}
<p><small>Each line is rounded once to the currency's minor unit (half up); the total is the sum of the lines.
Interpolated readings are estimated linearly between the two nearest reports.</small></p>
</body></html>
"""
