"""One self-contained HTML page: inline CSS, PNGs as base64 data URIs, no script, no CDN, so
it opens offline, from an e-mail attachment or a cluster's scratch disk alike.

Jinja2 with autoescaping: run names, overrides and file paths are user text.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from jinja2 import Environment

from ava.observe.report.figure import Panel

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Arial, "Liberation Sans", "DejaVu Sans", sans-serif;
       margin: 24px auto;
       max-width: 1040px; color: #222; background: #fff; padding: 0 12px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { margin: 1.2em 0 0.4em; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; } .grid figure { flex: 0 1 calc(50% - 8px); margin: 0; }
.warn { background: #fff6e0; border: 1px solid #f0c36d; padding: 8px 12px; font-size: 0.9em; }
code { font-size: 0.9em; }
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css|safe }}</style></head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ runs|length }} run(s): {% for r in runs %}<code>{{ r.path }}</code>{% if not loop.last %}, {% endif %}{% endfor %}</p>
{% if warnings %}<div class="warn" id="skipped-lines"><strong>{{ skipped }} unreadable line(s) skipped</strong>
<ul>{% for w in warnings %}<li><code>{{ w }}</code></li>{% endfor %}</ul></div>{% endif %}
<h2 id="summary">Run summary</h2>
<table><tr><th></th>{% for r in runs %}<th>{{ r.label }}</th>{% endfor %}</tr>
{% for name, values in summary %}<tr><th>{{ name }}</th>{% for v in values %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for section in sections %}<h2 id="{{ section.id }}">{{ section.title }}</h2>
{% for group in section.groups %}{% if group.title %}<h3>{{ group.title }}</h3>{% endif %}
<div class="{{ 'grid' if group.grid else 'column' }}">{% for p in group.panels %}
<figure id="panel-{{ p.id }}" data-panel="{{ p.id }}"><img alt="{{ p.title }}" width="{{ p.width }}" height="{{ p.height }}" src="data:image/png;base64,{{ p.b64 }}">
<figcaption><strong>{{ p.title }}</strong>{% if p.caption %}: {{ p.caption }}{% endif %}</figcaption></figure>{% endfor %}
</div>{% endfor %}{% endfor %}
<p class="meta">Written by <code>ava-report</code> from metrics.jsonl, events.jsonl, train.log and .hydra/ of each run.</p>
</body></html>
"""  # noqa: E501 (HTML lines read better whole)


@dataclass
class Group:
    """Panels shown together: a column of wide images or a grid of small ones."""

    title: str
    panels: Sequence[Panel]
    grid: bool = False


@dataclass
class Section:
    id: str
    title: str
    groups: Sequence[Group]


@dataclass
class RunHeader:
    label: str
    path: str


def _view(panel: Panel) -> dict:
    return {"id": panel.id, "title": panel.title, "caption": panel.caption, "width": panel.width,
            "height": panel.height, "b64": base64.b64encode(panel.png).decode("ascii")}


def render(title: str, runs: Sequence[RunHeader], summary: Sequence[Tuple[str, List[str]]],
           sections: Sequence[Section], warnings: Sequence[str], skipped: int) -> str:
    env = Environment(autoescape=True, trim_blocks=False)
    view = [{"id": s.id, "title": s.title,
             "groups": [{"title": g.title, "grid": g.grid, "panels": [_view(p) for p in g.panels]}
                        for g in s.groups]} for s in sections]
    return env.from_string(TEMPLATE).render(title=title, css=CSS, runs=runs, summary=summary,
                                            sections=view, warnings=warnings, skipped=skipped)
