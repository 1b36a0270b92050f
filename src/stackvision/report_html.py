"""The report's HTML: one self-contained page (its images are files beside it), each section a
``<section id=...>`` with an ``<h2>``, text escaped and file names made printable."""

from __future__ import annotations

import html
import os

from .report_analysis import HEADLINE, Pair, problem_counts, problem_list, spread

#: most problems listed one by one (the summary counts them all)
MAX_PROBLEMS = 200

LABELS = {
    "accuracy": "accuracy",
    "top5_accuracy": "top-5 accuracy",
    "log_loss": "log loss",
    "macro_f1": "macro F1",
}

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 12px;
color:#222;overflow-wrap:break-word}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right;vertical-align:middle}th{background:#f3f3f3;white-space:nowrap}td.l,th.l{text-align:left}
img{max-width:100%}nav{font-size:14px;margin-bottom:1em}nav a{margin-right:1em}
.facts li{margin:.15em 0}.muted{color:#666;font-size:13px}.bad{color:#b00}
.ex{display:inline-block;white-space:normal;width:104px;margin:0 3px;font-size:11px;text-align:center;
vertical-align:top}td.exs{white-space:nowrap;width:224px}.ex img{width:96px;height:96px;object-fit:cover;display:block;margin:auto}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:170px;font-size:12px}
figure img{width:160px;height:160px;object-fit:cover}
.scroll{max-height:640px;overflow-y:auto;display:inline-block;border:1px solid #eee}
code{font-size:12px;word-break:break-all}"""


def shown(text: str) -> str:
    """``text`` as printable UTF-8: a file name that is not valid UTF-8 (its bytes held as lone
    surrogates by Python) shows its odd bytes as ``\\xe9`` instead of failing the write."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (from JSON, say)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def e(text) -> str:
    """Escaped, printable text for HTML."""
    return html.escape(shown(str(text)))


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{e(sid)}"><h2>{e(title)}</h2>\n{body}\n</section>\n'


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else e(v)


def _spread_cells(k: str, s: dict | None) -> str:
    if not s:
        return "<td>-</td><td>-</td>"
    worst, best = ("max", "min") if k == "log_loss" else ("min", "max")
    return (
        f"<td>{s['mean']:.4f} \u00b1 {s['std']:.4f}</td>"
        f"<td>{s[worst]:.4f} \u2013 {s[best]:.4f}</td>"
    )


def headline(metrics: dict, keys: list[str]) -> str:
    """The headline table: each metric and, where there are folds, its spread across them."""
    sp = spread(metrics)
    head = "<tr><th class=l>metric</th><th>value</th>"
    if sp:
        n = next(iter(sp.values()))["n"]
        head += f"<th>across the {n} folds: mean \u00b1 std</th><th>worst \u2013 best fold</th>"
    rows = "".join(
        f"<tr><td class=l>{e(LABELS[k])}</td><td><b>{_num(metrics[k])}</b></td>"
        + (_spread_cells(k, sp.get(k)) if sp else "")
        + "</tr>"
        for k in keys
    )
    table = f"<table id=headline>{head}</tr>{rows}</table>"
    hold = metrics.get("holdout")
    if hold:
        rows = "".join(
            f"<tr><td class=l>{e(LABELS[k])}</td><td>{_num(hold[k])}</td></tr>"
            for k in keys
            if k in hold
        )
        table += f"<p>On the validation set given (the fold ensemble):</p><table>{rows}</table>"
    return table


def summary(
    metrics: dict, n_classes: int, problems, evaluated_on: str, details_on: str | None = None
) -> str:
    """The headline metrics (with their spread across folds), what they were measured on, the
    size of the data and what was wrong with it; ``details_on``: what the sections below were
    computed on, when that is not what the headline was."""
    keys = [k for k in HEADLINE if k in metrics and (k != "top5_accuracy" or n_classes > 5)]
    table = headline(metrics, keys)
    facts = [
        f"<li>Measured on: <b>{e(evaluated_on)}</b></li>",
        f"<li>{metrics.get('n_images', 0):,} images scored, {n_classes} classes</li>",
    ]
    if details_on:
        facts.append(f"<li>The pairs, tables and images below: on <b>{e(details_on)}</b></li>")
    counts = problem_counts(problems or [])
    n_bad = sum(c for _, c in counts)
    if n_bad:
        detail = "; ".join(f"{c} \u00d7 {e(r)}" for r, c in counts[:6])
        facts.append(
            f"<li class=bad>{n_bad} file(s) left out: {detail} "
            "(<a href='#data'>listed below</a>)</li>"
        )
    else:
        facts.append("<li>No file was left out.</li>")
    dup = metrics.get("duplicates")
    if dup is None:
        facts.append("<li class=muted>Identical images: not checked for this model kind.</li>")
    elif dup.get("groups"):
        facts.append(
            f"<li>{dup['groups']} set(s) of identical images ({dup.get('files', 0)} files), each "
            "kept on one side of every split; "
            f"{dup.get('label_conflicts', 0)} copies under two labels left out "
            "(<a href='#data'>listed below</a>)</li>"
        )
    else:
        facts.append("<li>No identical images.</li>")
    return table + f"<ul class=facts>{''.join(facts)}</ul>"


def evaluated_on(metrics: dict) -> str:
    """What the metrics were measured on, in words a reader understands."""
    v = str(metrics.get("validation", "the given data"))
    if v.startswith("evaluate on"):
        return f"a held-out set the model did not train on ({v[len('evaluate on ') :]})"
    if "out-of-fold" in v:
        return f"{v}: every image scored by a model that did not train on it"
    return v


def pairs_table(pairs: list[Pair], classes: list[str], thumbs: dict[int, str], y, proba) -> str:
    if not pairs:
        return "<p>No mistakes: no class is confused with another.</p>"
    head = (
        "<tr><th>#</th><th class=l>class A</th><th class=l>class B</th>"
        "<th>A taken for B</th><th>B taken for A</th><th>total</th><th class=l>examples</th></tr>"
    )
    rows = []
    for k, p in enumerate(pairs, 1):
        ex = []
        for r in p.examples:
            if r not in thumbs:
                continue
            t, pr = int(y[r]), int(proba[r].argmax())
            ex.append(
                f"<span class=ex><img src='{e(thumbs[r])}' alt='{e(classes[t])} as {e(classes[pr])}'>"
                f"{e(classes[t])} \u2192 <span class=bad>{e(classes[pr])}</span> "
                f"{proba[r, pr]:.0%}</span>"
            )
        for r in p.references:
            if r not in thumbs:
                continue
            t = int(y[r])
            ex.append(
                f"<span class='ex ref'><img src='{e(thumbs[r])}' alt='{e(classes[t])}, for "
                f"comparison'>a real {e(classes[t])}, for comparison</span>"
            )
        rows.append(
            f"<tr><td>{k}</td><td class=l>{e(classes[p.a])}</td><td class=l>{e(classes[p.b])}</td>"
            f"<td>{p.a_as_b} ({p.share_a:.0%})</td><td>{p.b_as_a} ({p.share_b:.0%})</td>"
            f"<td><b>{p.total}</b></td><td class='l exs'>{''.join(ex)}</td></tr>"
        )
    note = (
        "<p class=muted>Counts both ways; the share is of the images of the true class. "
        "Examples: the mistaken images, most confident first; a pair with one mistake also shows "
        "a real image of the class it was taken for.</p>"
    )
    return note + f"<table id=pairs-table>{head}{''.join(rows)}</table>"


def _taken_for(r: dict) -> str:
    if not r["confused_with"]:
        return "-"
    return f"{e(r['confused_with'])} ({r['confused_count']})"


def per_class_table(rows: list[dict], plot: str | None) -> str:
    head = (
        "<tr><th class=l>class</th><th>recall</th><th>precision</th><th>F1</th><th>images</th>"
        "<th class=l>most often taken for</th></tr>"
    )
    body = "".join(
        f"<tr><td class=l>{e(r['class'])}</td><td>{r['recall']:.3f}</td>"
        f"<td>{r['precision']:.3f}</td><td>{r['f1']:.3f}</td><td>{r['support']}</td>"
        f"<td class=l>{_taken_for(r)}</td></tr>"
        for r in rows
    )
    img = (
        f"<details><summary>recall of the worst classes, as a plot</summary><img src='{e(plot)}' "
        "alt='per-class accuracy'></details>"
        if plot
        else ""
    )
    return (
        "<p class=muted>Worst recall first. Recall: share of the class's images predicted as it; "
        "precision: share of the predictions of the class that were right.</p>"
        f"<div class=scroll><table id=per-class-table>{head}{body}</table></div>{img}"
    )


def matrix_part(
    focus_png: str, n_focus: int, n_classes: int, overview_png: str | None, confused: bool = True
) -> str:
    which = " (those of the top confusions)" if confused else ""
    what = (
        f"all {n_classes} classes, in clustered order"
        if n_focus == n_classes
        else f"{n_focus} of the {n_classes} classes{which}, in clustered order"
    )
    out = (
        f"<p class=muted>Rows: true class; columns: predicted; each cell the share of the true "
        f"class. Shown: {what}. The full matrix (counts, class names as header and index): "
        "<a href='confusion_matrix.csv'>confusion_matrix.csv</a>.</p>"
        f"<img id=confusion-focus src='{e(focus_png)}' alt='confusion matrix'>"
    )
    if overview_png:
        out += (
            "<p class=muted>All classes in clustered order, mistakes only: a dark block off the "
            "diagonal is a group of classes confused with each other.</p>"
            f"<img id=confusion-overview src='{e(overview_png)}' alt='confusion overview'>"
        )
    return out


def gallery(cards: list[tuple[str, str, str, str, float]]) -> str:
    if not cards:
        return "<p>No mistakes.</p>"
    return '<div class="gallery">' + "".join(
        f"<figure><img src='{e(rel)}' title='{e(src)}'><figcaption>true: <b>{e(t)}</b><br>"
        f"predicted: <b class=bad>{e(p)}</b> ({c:.1%})<br>"
        f"<small>{e(os.path.basename(src))}</small></figcaption></figure>"
        for rel, src, t, p, c in cards
    ) + "</div>"  # fmt: skip


def data_part(problems, metrics: dict) -> str:
    items = problem_list(problems or [])
    lis = "".join(f"<li><code>{e(p)}</code>: {e(r)}</li>" for p, r in items[:MAX_PROBLEMS])
    if len(items) > MAX_PROBLEMS:
        lis += f"<li>... and {len(items) - MAX_PROBLEMS} more (all in metrics.json)</li>"
    dup = metrics.get("duplicates") or {}
    dups = "".join(
        "<li>" + ", ".join(f"<code>{e(x)}</code>" for x in group) + "</li>"
        for group in dup.get("sets", [])
    )
    return (
        f"<h3>Images left out ({len(items)})</h3><ul>{lis or '<li>none</li>'}</ul>"
        f"<h3>Identical images ({dup.get('groups', 0)} set(s), each on one side of every split)"
        f"</h3><ul>{dups or '<li>none</li>'}</ul>"
    )


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: ``sections`` are (id, title, inner HTML), in order, with a contents bar."""
    nav = "".join(f"<a href='#{e(sid)}'>{e(t)}</a>" for sid, t, _ in sections)
    body = "".join(section(sid, t, inner) for sid, t, inner in sections)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body><h1>{e(title)}</h1><nav>{nav}</nav>\n{body}"
        "</body></html>\n"
    )
