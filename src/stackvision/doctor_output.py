"""What the data doctor writes: ``doctor.json`` (everything), ``doctor.csv`` (one row per finding,
with an ``action`` column the user edits and feeds back with ``train --exclude``), and an HTML
section with thumbnails (a page of its own for ``stackvision doctor``, a section of every
``train`` report).

CSV columns (:data:`CSV_COLUMNS`): ``path, split, issue, given_label, suggested_label, evidence,
group, action``. ``issue`` is one of ``label`` (likely mislabelled), ``leak`` (a near-duplicate
of an image on the other side of train/``--val``), ``duplicate`` (near-duplicates within one
side), ``outlier``. Default actions: ``relabel`` (to ``suggested_label``) for likely label
errors whose suggested class has an out-of-fold probability of at least :data:`RELABEL_PROB`,
``exclude`` for the other label errors and for the training copy of a leak; ``keep`` for
duplicates within one side (correct labels: only a split problem, which ``train
--group-duplicates`` handles; set ``exclude`` to thin them out), for outliers (look at them) and
for validation rows. The user edits any of them (``suggested_label`` too);
:mod:`stackvision.corrections` reads the CSV back. BENCHMARKS.md ("doctor") measures these
defaults against the alternatives: excluding images costs small classes about as much as the
wrong labels did; a confident suggestion on an injected flip was the true class 93-97% of the time.
"""

from __future__ import annotations

import csv
import io
import os

from .doctor import Diagnosis
from .report import Section
from .report_html import e, shown

DOCTOR_FORMAT = "stackvision-doctor"
CSV_COLUMNS = [
    "path", "split", "issue", "given_label", "suggested_label", "evidence", "group", "action",
]  # fmt: skip
ACTIONS = ("exclude", "relabel", "keep")
#: a likely label error is relabelled (not excluded) by default when its suggested class has at
#: least this out-of-fold probability: more likely than every other class together
RELABEL_PROB = 0.5
#: thumbnails per list in the HTML (label issues, leaks, duplicates, outliers)
THUMBS_PER_LIST = 12
THUMB_PX = 112


def to_json(d: Diagnosis, extra: dict | None = None) -> dict:
    groups = [{k: v for k, v in g.items() if k != "rows"} for g in d.groups]
    issues = [{k: v for k, v in x.items() if k != "row"} for x in d.label_issues]
    outliers = [{k: v for k, v in x.items() if k != "row"} for x in d.outliers]
    return {
        "format": DOCTOR_FORMAT,
        "format_version": 1,
        **(extra or {}),
        "summary": d.summary(),
        "stats": d.stats,
        "label_issues": issues,
        "duplicate_groups": groups,
        "outliers": outliers,
        "class_problems": d.class_problems,
    }


def label_action(issue: dict) -> str:
    """``relabel`` when the suggestion is confident (see :data:`RELABEL_PROB`), else ``exclude``."""
    return "relabel" if issue["top_prob"] >= RELABEL_PROB else "exclude"


def csv_rows(d: Diagnosis) -> list[dict]:
    """One row per finding, the most urgent first (leaks, label issues, duplicates, outliers)."""
    rows = []
    for g in d.leaks:
        for p, s, lab in zip(g["paths"], g["splits"], g["labels"]):
            rows.append({"path": p, "split": s, "issue": "leak", "given_label": lab,
                         "evidence": f"near-duplicate across train and val (score {g['score']})",
                         "group": g["group"], "action": "exclude" if s == "train" else "keep"})  # fmt: skip
    for x in d.label_issues:
        rows.append({"path": x["path"], "split": "train", "issue": "label",
                     "given_label": x["given_label"], "suggested_label": x["suggested_label"],
                     "evidence": f"p(given)={x['given_prob']:.3f}, p({x['suggested_label']})={x['top_prob']:.3f}",
                     "group": "", "action": label_action(x)})  # fmt: skip
    for g in d.groups:
        if g["leak"]:
            continue
        what = "identical bytes" if g["identical"] else f"near-duplicate (score {g['score']})"
        for k, (p, s, lab) in enumerate(zip(g["paths"], g["splits"], g["labels"])):
            rows.append({"path": p, "split": s, "issue": "duplicate", "given_label": lab,
                         "evidence": what + (" (first copy)" if k == 0 else ""),
                         "group": g["group"], "action": "keep"})  # fmt: skip
    for o in d.outliers:
        rows.append({"path": o["path"], "split": o["split"], "issue": "outlier",
                     "given_label": o["label"],
                     "evidence": f"density z={o['density_z']}, class-centre z={o['centre_z']}, "
                                 f"nearest class {o['nearest_class']}",
                     "group": "", "action": "keep"})  # fmt: skip
    return [{c: r.get(c, "") for c in CSV_COLUMNS} for r in rows]


def csv_text(d: Diagnosis) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in csv_rows(d):
        w.writerow({k: shown(str(v)) for k, v in r.items()})
    return buf.getvalue()


def _thumb(path: str) -> bytes | None:
    from .images import ImageDecodeError, load_rgb

    try:
        img = load_rgb(path, min_side=THUMB_PX)
    except (ImageDecodeError, OSError):  # unreadable, or a shard row known by its hash only
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


class _Thumbs:
    def __init__(self, prefix: str):
        self.prefix, self.files, self.by_path = prefix, {}, {}

    def img(self, path: str) -> str:
        if path not in self.by_path:
            data = _thumb(path)
            rel = f"{self.prefix}/{len(self.by_path):04d}.jpg" if data else None
            if data:
                self.files[rel] = data
            self.by_path[path] = rel
        rel = self.by_path[path]
        return f"<img src='{e(rel)}' alt='' title='{e(path)}'>" if rel else "(unreadable)"


def _fig(th: _Thumbs, path: str, caption: str) -> str:
    return (f"<figure>{th.img(path)}<figcaption>{caption}<br><small>"
            f"{e(os.path.basename(path))}</small></figcaption></figure>")  # fmt: skip


def section_html(d: Diagnosis, thumbs_prefix: str = "doctor") -> tuple[str, dict[str, bytes]]:
    """The HTML of the doctor's findings and the thumbnail files it shows."""
    th = _Thumbs(thumbs_prefix)
    s = d.summary()
    parts = [
        "<p>Found on the cached features (out-of-fold probabilities, nearest neighbours); "
        "<code>doctor.csv</code> lists every finding with an <code>action</code> to edit and "
        "feed back with <code>stackvision train --exclude doctor.csv</code>.</p>",
        "<ul class=facts>"
        f"<li><b>{s['label_issues']}</b> likely label error(s) among {s['n_train']:,} training images</li>"
        f"<li><b class={'bad' if s['leaks'] else ''}>{s['leaks']}</b> train/val leak group(s)</li>"
        f"<li><b>{s['duplicate_groups']}</b> near-duplicate group(s) ({s['duplicate_files']} files)</li>"
        f"<li><b>{s['outliers']}</b> outlier(s); <b>{s['class_problems']}</b> class problem(s)</li></ul>",
    ]  # fmt: skip
    if d.leaks:
        parts.append(
            f"<h3 class=bad>LEAKS: near-duplicates across train and val ({len(d.leaks)})</h3>"
        )
        for g in d.leaks[:THUMBS_PER_LIST]:
            figs = "".join(
                _fig(th, p, f"{e(sp)}: {e(lab)}")
                for p, sp, lab in zip(g["paths"], g["splits"], g["labels"])
            )
            parts.append(f"<div class=gallery>{figs}</div>")
    if d.label_issues:
        parts.append(f"<h3>Likely label errors ({len(d.label_issues)}, most certain first)</h3>")
        figs = "".join(
            _fig(
                th,
                x["path"],
                f"given <b class=bad>{e(x['given_label'])}</b> ({x['given_prob']:.1%})"
                f"<br>suggested <b>{e(x['suggested_label'])}</b> ({x['top_prob']:.1%})",
            )
            for x in d.label_issues[:THUMBS_PER_LIST]
        )
        parts.append(f"<div class=gallery>{figs}</div>")
    dups = [g for g in d.groups if not g["leak"]]
    if dups:
        parts.append(f"<h3>Near-duplicate groups ({len(dups)})</h3>")
        for g in dups[: THUMBS_PER_LIST // 2]:
            figs = "".join(_fig(th, p, e(lab)) for p, lab in zip(g["paths"][:4], g["labels"]))
            parts.append(f"<div class=gallery>{figs}</div>")
    if d.outliers:
        parts.append(f"<h3>Outliers ({len(d.outliers)})</h3>")
        figs = "".join(
            _fig(th, o["path"], f"{e(o['label'])}; nearest class {e(o['nearest_class'])}")
            for o in d.outliers[:THUMBS_PER_LIST]
        )
        parts.append(f"<div class=gallery>{figs}</div>")
    if d.class_problems:
        rows = "".join(
            f"<tr><td class=l>{e(c['kind'])}</td><td class=l>{e(' / '.join(c['classes']))}</td>"
            f"<td class=l>{e(c['detail'])}</td></tr>"
            for c in d.class_problems
        )
        parts.append("<h3>Class problems</h3><table><tr><th class=l>problem</th><th class=l>classes</th>"
                     f"<th class=l>evidence</th></tr>{rows}</table>")  # fmt: skip
    if not any(
        s[k] for k in ("label_issues", "leaks", "duplicate_groups", "outliers", "class_problems")
    ):
        parts.append("<p>Nothing found.</p>")
    return "".join(parts), th.files


def report_section(d: Diagnosis) -> Section:
    """The "Data doctor" section of a report (thumbnails under ``doctor/``)."""
    html, files = section_html(d)
    return Section("Data doctor", html, id="doctor", files=files)


def write_doctor_dir(
    d: Diagnosis, out_dir: str, extra: dict | None = None, title: str = ""
) -> None:
    """``doctor.json``, ``doctor.csv`` and ``report.html`` (+ ``doctor/`` thumbnails) into a folder
    (the caller makes it atomic); ``doctor.json`` is written last and marks it as ours."""
    from .atomic import write_json
    from .report_html import page

    with open(os.path.join(out_dir, "doctor.csv"), "w", encoding="utf-8", newline="") as fh:
        fh.write(csv_text(d))
    html, files = section_html(d)
    for rel, data in files.items():
        os.makedirs(os.path.join(out_dir, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(out_dir, rel), "wb") as fh:
            fh.write(data)
    with open(
        os.path.join(out_dir, "report.html"), "w", encoding="utf-8", errors="backslashreplace"
    ) as fh:
        fh.write(page(title or "stackvision data doctor", [("doctor", "Data doctor", html)]))
    write_json(os.path.join(out_dir, "doctor.json"), to_json(d, extra))
