"""vaelab-report's page: report.html, one self-contained file (every figure embedded as a PNG data URI, no script,
no network) that opens offline, e.g. from a cluster's file system. It holds the table (mean +- std over seeds), the
test NLL per configuration with its spread over seeds and its Monte Carlo standard error, the training and
validation curves, and each configuration's labelled sample and reconstruction grids."""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path

from vaelab.console import plural
from vaelab.files import atomic_write
from vaelab.pixels import pixels_note
from vaelab.reporting.figures import curves_figure, nll_figure


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def grids(runs) -> list[tuple[str, list[tuple[str, Path, str]]]]:
    """Per configuration (its first finished seed): [(title, PNG, caption)] of its sample and reconstruction grids,
    and of its post-hoc GMM samples when vaelab-sample sampler=gmm drew them."""
    chosen, out = set(), []
    for run in runs:
        if run.status != "finished" or run.label in chosen:
            continue
        chosen.add(run.label)
        found = []
        samples, recons = run.path / "samples" / "samples_final.png", run.path / "samples" / "reconstructions_final.png"
        if samples.is_file():
            found.append(("prior samples", samples, "z ~ p(z), decoded to the mean of p(x|z)"))
        gmm = sorted((run.path / "samples").glob("*/gmm_samples.png"))
        if gmm:
            found.append(("GMM samples", gmm[-1], "z from a Gaussian mixture fitted to the training set's posterior "
                          "means (vaelab-sample sampler=gmm)"))
        if recons.is_file():
            found.append(("reconstructions", recons, "rows 1, 3, 5, ...: validation images (originals); the row "
                          "below each: their reconstructions"))
        if found:
            out.append((f"{run.label}" + (f" (seed {run.seed})" if run.seed is not None else ""), found))
    return out


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1500px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figcaption{font-size:0.85em;color:#555;max-width:360px}
figure img{width:360px;image-rendering:pixelated}
.config{margin-bottom:1.5em}"""


def wandb_links(runs) -> list[tuple[object, str]]:
    """Each run's W&B run in one line: its id and page online; offline, its directory and the `wandb sync` that
    uploads it (from results.json); runs without W&B are left out."""
    links = []
    for run in runs:
        w = run.results.get("wandb") or {}
        if not w.get("id"):
            continue
        where = w["url"] if w.get("url") else f"offline: {w.get('dir')} (upload: wandb sync {w.get('dir')})"
        group = f", group {w['group']}" if w.get("group") else ""
        links.append((run, f"W&B run {w['id']}{group}: {where}"))
    return links


def _num(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def write_page(root: Path, rows: list[dict], runs, columns: list[tuple[str, str]], commands: list[str] = (),
               differing: list[str] = ()) -> Path:
    from vaelab import __version__

    head = ["configuration", "seeds", "pixels", *[h for _, h in columns], "MC s.e.", "parameters", "epochs",
            "train time (s)"]
    body = []
    for row in rows:
        cells = [html.escape(str(row["configuration"])), str(row["finished"]), html.escape(str(row.get("pixels", "-")))]
        for key, _ in columns:
            mean, std = row.get(key), row.get(key + " std")
            cells.append("" if mean is None else (f"{mean:.2f} ± {std:.2f}" if row["finished"] > 1 else f"{mean:.2f}"))
        cells += [_num(row.get("nll mc se"), ".3f"), _num(row.get("parameters"), ","), _num(row.get("epochs"), "d"),
                  _num(row.get("train time s"), ".0f")]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body)
             + "</table>" + (f"<p>{html.escape(note)}</p>" if (note := pixels_note(rows)) else ""))
    failed = [r for r in runs if r.status != "finished"]
    failed_html = "" if not failed else "<h2>Runs that did not finish</h2><ul>" + "".join(
        f"<li><code>{html.escape(str(r.path))}</code> ({html.escape(r.label)}, seed {r.seed}): "
        f"{html.escape(str(r.error or r.status))}</li>" for r in failed) + "</ul>"
    links = wandb_links(runs)
    links_html = "" if not links else "<h2>W&amp;B runs</h2><ul>" + "".join(
        f"<li><code>{html.escape(str(r.path))}</code> ({html.escape(r.label)}, seed {r.seed}): "
        + (f'W&amp;B run <a href="{html.escape(r.results["wandb"]["url"])}">{html.escape(r.results["wandb"]["id"])}</a>'
           if r.results["wandb"].get("url") else html.escape(line)) + "</li>" for r, line in links) + "</ul>"
    sections = []
    for title, found in grids(runs):
        figures = "".join(f'<figure><img src="{_data_uri(png.read_bytes())}" alt="{html.escape(title)}: {name}">'
                          f"<figcaption><b>{name}</b>: {html.escape(caption)}</figcaption></figure>"
                          for name, png, caption in found)
        sections.append(f'<div class="config"><h3>{html.escape(title)}</h3>{figures}</div>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vaelab report: {html.escape(root.name)}</title>
<style>{STYLE}</style></head><body>
<h1>vaelab report</h1><p><code>{html.escape(str(root))}</code>: {plural(len(runs), 'run')},
{plural(len(rows), 'configuration')}. Test metrics in nats per image (bits/dim aside); mean ± std over seeds; MC
s.e.: the Monte Carlo standard error of the importance-sampled test NLL.</p>
<p class="meta">Made {html.escape(time.strftime("%Y-%m-%d %H:%M %Z"))} by vaelab {html.escape(__version__)}, from
{"; ".join(f"<code>{html.escape(c)}</code>" for c in commands) or "runs without a recorded command"}.
{"Config keys that differ between the configurations: " + ", ".join(f"<code>{html.escape(k)}</code>"
 for k in differing) + "." if differing else "The configurations differ in no config key but the seed."}</p>
<h2>Results</h2>{table}{failed_html}{links_html}
<h2>Test NLL</h2><img src="{_data_uri(nll_figure(rows, runs))}" alt="test NLL per configuration">
<h2>Training and validation curves</h2><img src="{_data_uri(curves_figure(runs))}" alt="training and validation curves">
<h2>Samples and reconstructions</h2>{''.join(sections) or '<p>No sample grids were found.</p>'}
</body></html>
"""
    path = root / "report.html"
    with atomic_write(path) as f:
        f.write(page)
    return path
