"""The timeline page: server-rendered HTML with one inline SVG. No script, no CDN, no web font.

Every point and band is focusable (tabindex) and carries an SVG <title> with its source reading,
so a mouse hover and a keyboard focus show the same text. Colours: ColorBrewer YlOrBr (safe for
the common colour-vision deficiencies), each band also printed with its grade number, "at least"
as hatching and "≥", the fever waiver as "w".
"""
from __future__ import annotations

from datetime import datetime, timedelta
from html import escape

from .timeline import ICANS_KINDS, PARTS, HourGrade, Timeline

GRADE_FILL = {0: "#f7f7f7", 1: "#fee391", 2: "#fec44f", 3: "#ec7014", 4: "#8c2d04"}
GRADE_TEXT = {0: "#333", 1: "#333", 2: "#333", 3: "#000", 4: "#fff"}
NOT_GRADED = "#d9d9d9"
LEFT = 190          # label column
RIGHT = 44
ROW = {"crs": 30, "icans": 30, "temperature": 90, "pressure": 90, "oxygen": 56, "pressors": 30, "doses": 40,
       "icans_domains": 96}
GAP = 10

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#111;background:#fff}
h1{font-size:20px;margin:0 0 4px}
.sub{color:#444;margin:0 0 10px}
.missing{border:2px solid #8c2d04;background:#fff5eb;padding:8px 12px;margin:8px 0}
.missing h2{font-size:16px;margin:0 0 4px;color:#8c2d04}
.now{margin:6px 0 10px}
.now b{font-size:16px}
.legend{display:flex;flex-wrap:wrap;gap:14px;margin:8px 0;font-size:13px}
.legend span{display:inline-flex;align-items:center;gap:4px}
.sw{display:inline-block;width:18px;height:14px;border:1px solid #555}
figure{margin:0;overflow-x:auto}
svg{max-width:100%;height:auto}
svg text{font-size:11px;fill:#222}
nav.windows a{margin-right:12px}
svg .lane{font-size:12px;font-weight:600}
svg [tabindex]:focus{outline:none}
svg [tabindex]:focus>rect,svg [tabindex]:focus>circle,svg [tabindex]:focus>path{stroke:#000;stroke-width:3}
.tip{color:#444;font-size:12px}
table.src{border-collapse:collapse;font-size:12px;margin-top:12px}
table.src td,table.src th{border:1px solid #ccc;padding:2px 6px;text-align:left}
@media print{
  body{margin:0;font-size:11px}
  .noprint{display:none}
  figure{overflow:visible}
  svg{width:100%;height:auto}
  .missing{break-inside:avoid}
}
"""


def _t(moment: datetime, zone) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


class Canvas:
    def __init__(self, timeline: Timeline):
        self.tl = timeline
        self.start = timeline.hours[0].end - timedelta(hours=1) if timeline.hours else timeline.now
        self.start = min(self.start, timeline.view_start or self.start)
        self.end = timeline.now
        span_hours = max(1.0, (self.end - self.start).total_seconds() / 3600)
        self.px = max(1.5, min(45.0, 1080 / span_hours))
        self.width = LEFT + span_hours * self.px + RIGHT
        self.parts: list[str] = []
        self.y = 28

    def x(self, moment: datetime) -> float:
        return LEFT + (moment - self.start).total_seconds() / 3600 * self.px

    def add(self, text: str) -> None:
        self.parts.append(text)


def _focusable(inner: str, title: str, cls: str = "", data: str = "") -> str:
    return (f'<g tabindex="0" class="{cls}" {data} role="img" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>{inner}</g>")


def _runs(hours: list[HourGrade], pick) -> list[tuple[int, int, tuple]]:
    """Consecutive hours with the same band: (first index, last index, key)."""
    runs: list[tuple[int, int, tuple]] = []
    for i, hour in enumerate(hours):
        key = pick(hour)
        if runs and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], i, key)
        else:
            runs.append((i, i, key))
    return runs


def _grade_key(grade) -> tuple:
    return (grade.value, grade.at_least, HourGrade.waived(grade))


def _grade_lane(c: Canvas, name: str, attr: str) -> None:
    tl, y, h = c.tl, c.y, ROW[attr]
    c.add(f'<text class="lane" x="8" y="{y + h / 2 + 4}">{name} grade</text>')
    for first, last, (value, at_least, waived) in _runs(tl.hours, lambda hr: _grade_key(getattr(hr, attr))):
        x0 = c.x(tl.hours[first].end - timedelta(hours=1)) if first else c.x(c.start)
        x0 = max(x0, LEFT)
        x1 = c.x(tl.hours[last].end)
        width = max(1.0, x1 - x0)
        fill = GRADE_FILL.get(value, NOT_GRADED) if value is not None else NOT_GRADED
        label = "–" if value is None else f"{'≥' if at_least else ''}{value}{'w' if waived else ''}"
        inner = f'<rect x="{x0:.1f}" y="{y}" width="{width:.1f}" height="{h}" fill="{fill}" stroke="#777" stroke-width=".5"/>'
        if at_least:
            inner += f'<rect x="{x0:.1f}" y="{y}" width="{width:.1f}" height="{h}" fill="url(#hatch)"/>'
        if width >= 12:
            colour = GRADE_TEXT.get(value, "#333") if value is not None else "#333"
            inner += (f'<text x="{x0 + width / 2:.1f}" y="{y + h / 2 + 4}" text-anchor="middle" '
                      f'style="fill:{colour};font-weight:700;font-size:12px">{label}</text>')
        elif last == len(tl.hours) - 1:  # a band too narrow for its number, at now: the number beside it
            inner += (f'<text x="{x1 + 4:.1f}" y="{y + h / 2 + 4}" '
                      f'style="font-weight:700;font-size:12px">{label}</text>')
        grade = getattr(tl.hours[last], attr)
        title = (f"{name} {grade.text if value is not None else 'not graded'}"
                 f"{' (fever waived after treatment)' if waived else ''}, hours ending "
                 f"{_t(tl.hours[first].end, tl.zone)} to {_t(tl.hours[last].end, tl.zone)}. "
                 f"At {_t(tl.hours[last].end, tl.zone)}: {grade.reason}.")
        evidence = "; ".join(e.sentence for e in grade.evidence[:4])
        if evidence:
            title += f" Evidence: {evidence}."
        if at_least and grade.missing:
            title += " Not read: " + "; ".join(grade.missing[:3]) + "."
        data = (f'data-lane="{attr}" data-grade="{"" if value is None else value}" data-at-least="{str(at_least).lower()}" '
                f'data-waived="{str(waived).lower()}" data-from="{tl.hours[first].end.isoformat()}" '
                f'data-to="{tl.hours[last].end.isoformat()}"')
        c.add(_focusable(inner, title, "band", data))
    c.y += h + GAP


def _missing_lane(c: Canvas, key: str, y: float, h: float) -> bool:
    if key not in c.tl.missing:
        return False
    c.add(f'<rect x="{LEFT}" y="{y}" width="{c.width - LEFT - RIGHT:.1f}" height="{h}" fill="url(#hatch)" '
          f'stroke="#8c2d04"/>')
    c.add(f'<text x="{LEFT + 8}" y="{y + h / 2 + 4}" style="fill:#8c2d04;font-weight:700" data-missing="{key}">'
          f'Missing: {escape(PARTS.get(key, key))} could not be read</text>')
    return True


def _scale_lane(c: Canvas, label: str, key: str, height: int, low: float, high: float, guides: list[float],
                series: list[tuple[list, str, str, bool]]) -> None:
    """Points on a value scale. ``series``: (points [(time, value, title)], colour, name, hollow)."""
    y = c.y
    c.add(f'<text class="lane" x="8" y="{y + 14}">{label}</text>')
    c.add(f'<rect x="{LEFT}" y="{y}" width="{c.width - LEFT - RIGHT:.1f}" height="{height}" fill="none" stroke="#bbb"/>')

    def vy(value: float) -> float:
        value = min(max(value, low), high)
        return y + height - (value - low) / (high - low) * height

    for guide in guides:
        c.add(f'<line x1="{LEFT}" x2="{c.width - RIGHT:.1f}" y1="{vy(guide):.1f}" y2="{vy(guide):.1f}" '
              f'stroke="#999" stroke-dasharray="4 3"/><text x="{LEFT - 6}" y="{vy(guide) + 4:.1f}" '
              f'text-anchor="end">{guide:g}</text>')
    if not _missing_lane(c, key, y, height):
        for points, colour, name, hollow in series:
            if len(points) > 1:
                path = " ".join(f"{c.x(t):.1f},{vy(v):.1f}" for t, v, _ in points)
                c.add(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.2" opacity=".6"/>')
            for t, v, title in points:
                fill = "#fff" if hollow else colour
                c.add(_focusable(f'<circle cx="{c.x(t):.1f}" cy="{vy(v):.1f}" r="3.5" fill="{fill}" '
                                 f'stroke="{colour}" stroke-width="1.5"/>', title, "point",
                                 f'data-kind="{name}" data-time="{t.isoformat()}" data-value="{v:g}"'))
    c.y += height + GAP


def _oxygen_lane(c: Canvas) -> None:
    tl, y, h = c.tl, c.y, ROW["oxygen"]
    c.add(f'<text class="lane" x="8" y="{y + 14}">Oxygen</text>'
          f'<text x="8" y="{y + 30}">tier (engine) · flow L/min</text>')
    if _missing_lane(c, "oxygen", y, h):
        c.y += h + GAP
        return
    band_h = 22
    for first, last, (tier,) in _runs(tl.hours, lambda hr: (hr.crs.components.get("hypoxia"),)):
        if not tier:
            continue
        x0 = max(LEFT, c.x(tl.hours[first].end - timedelta(hours=1)))
        width = max(1.0, c.x(tl.hours[last].end) - x0)
        words = {1: "O2 tier 1", 2: "low-flow O2 (tier 2)", 3: "high-flow O2 (tier 3)", 4: "positive pressure (tier 4)"}
        c.add(_focusable(f'<rect x="{x0:.1f}" y="{y}" width="{width:.1f}" height="{band_h}" '
                         f'fill="{GRADE_FILL.get(tier, NOT_GRADED)}" stroke="#777" stroke-width=".5"/>'
                         + (f'<text x="{x0 + 3:.1f}" y="{y + 15}">{tier}</text>' if width > 10 else ""),
                         f"Oxygen: {words.get(tier, tier)} as the engine read it, hours ending "
                         f"{_t(tl.hours[first].end, tl.zone)} to {_t(tl.hours[last].end, tl.zone)}",
                         "band", f'data-lane="oxygen" data-tier="{tier}"'))
    for reading in tl.readings.get("o2_device", []):
        c.add(_focusable(f'<path d="M{c.x(reading.end):.1f},{y + band_h + 2} l-4,8 h8 z" fill="#555"/>',
                         f"{reading.label} at {_t(reading.end, tl.zone)} ({reading.reference})", "point",
                         f'data-kind="o2_device" data-time="{reading.end.isoformat()}"'))
    for reading in tl.readings.get("o2_flow", []):
        x = c.x(reading.end)
        c.add(_focusable(f'<circle cx="{x:.1f}" cy="{y + h - 10}" r="3" fill="#2c7fb8"/>'
                         f'<text x="{x + 4:.1f}" y="{y + h - 6}">{reading.value:g}</text>',
                         f"{reading.label} at {_t(reading.end, tl.zone)} ({reading.reference})", "point",
                         f'data-kind="o2_flow" data-time="{reading.end.isoformat()}" data-value="{reading.value:g}"'))
    c.y += h + GAP


def _pressor_lane(c: Canvas) -> None:
    tl, y, h = c.tl, c.y, ROW["pressors"]
    c.add(f'<text class="lane" x="8" y="{y + h / 2 + 4}">Vasopressors running</text>')
    if _missing_lane(c, "medications", y, h):
        c.y += h + GAP
        return
    for first, last, (names,) in _runs(tl.hours, lambda hr: (tuple(hr.pressors),)):
        if not names:
            continue
        x0 = max(LEFT, c.x(tl.hours[first].end - timedelta(hours=1)))
        width = max(1.0, c.x(tl.hours[last].end) - x0)
        text = f"{len(names)}: {', '.join(names)}"
        c.add(_focusable(f'<rect x="{x0:.1f}" y="{y}" width="{width:.1f}" height="{h}" fill="#bdc9e1" stroke="#045a8d"/>'
                         + (f'<text x="{x0 + 3:.1f}" y="{y + h / 2 + 4}">{escape(text)}</text>' if width > 6.2 * len(text) + 6
                            else f'<text x="{x0 + 2:.1f}" y="{y + h / 2 + 4}">{len(names)}</text>' if width > 9 else ""),
                         f"{len(names)} vasopressor(s) running at the end of the hours ending "
                         f"{_t(tl.hours[first].end, tl.zone)} to {_t(tl.hours[last].end, tl.zone)}: {', '.join(names)}",
                         "band", f'data-lane="pressors" data-count="{len(names)}"'))
    c.y += h + GAP


DOSE_MARK = {"tocilizumab": ("T", "#ec7014"), "corticosteroid": ("S", "#6a51a3"), "antipyretic": ("A", "#2c7fb8"),
             "IEC therapy": ("★", "#000")}


def _dose_lane(c: Canvas) -> None:
    tl, y, h = c.tl, c.y, ROW["doses"]
    c.add(f'<text class="lane" x="8" y="{y + 14}">Doses</text>'
          f'<text x="8" y="{y + 27}">★ IEC therapy · T tocilizumab</text>'
          f'<text x="8" y="{y + 39}">S corticosteroid · A antipyretic</text>')
    if _missing_lane(c, "medications", y, h):
        c.y += h + GAP
        return
    items = [("IEC therapy", d) for d in tl.iec] + tl.doses
    for label, drug in items:
        mark, colour = DOSE_MARK[label]
        x = c.x(max(drug.start, c.start))
        dose = f" {drug.dose_mg:g} mg" if drug.dose_mg is not None else ""
        c.add(_focusable(f'<circle cx="{x:.1f}" cy="{y + h / 2}" r="9" fill="#fff" stroke="{colour}" stroke-width="2"/>'
                         f'<text x="{x:.1f}" y="{y + h / 2 + 4}" text-anchor="middle" '
                         f'style="fill:{colour};font-weight:700">{mark}</text>',
                         f"{label}: {drug.agent}{dose} ({drug.status}) at {_t(drug.start, tl.zone)} ({drug.reference})",
                         "dose", f'data-dose="{label}" data-time="{drug.start.isoformat()}"'))
    c.y += h + GAP


def _icans_domains_lane(c: Canvas) -> None:
    tl, y, h = c.tl, c.y, ROW["icans_domains"]
    c.add(f'<text class="lane" x="8" y="{y + 14}">ICANS domains</text>'
          f'<text x="8" y="{y + 30}">ICE 0–10 (●) · CAPD (○)</text>'
          f'<text x="8" y="{y + 46}">LoC · seizure · motor · edema</text>')
    if _missing_lane(c, "assessments", y, h):
        c.y += h + GAP
        return
    score_h = 60
    c.add(f'<rect x="{LEFT}" y="{y}" width="{c.width - LEFT - RIGHT:.1f}" height="{score_h}" fill="none" stroke="#bbb"/>')
    for guide in (0, 5, 10):
        gy = y + score_h - guide / 10 * score_h
        c.add(f'<text x="{LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">{guide}</text>')
    for kind, colour, hollow in (("ice", "#045a8d", False), ("capd", "#6a51a3", True)):
        previous = None
        for r in tl.readings.get(kind, []):
            value = min(max(float(r.value), 0), 10) if kind == "ice" else min(float(r.value), 30) / 3
            cy = y + score_h - value / 10 * score_h
            shown = f'<text x="{c.x(r.end) + 5:.1f}" y="{cy + 4:.1f}">{r.value}</text>' if r.value != previous else ""
            previous = r.value  # the number only where it changes; every point names it on hover
            c.add(_focusable(f'<circle cx="{c.x(r.end):.1f}" cy="{cy:.1f}" r="3.5" fill="{"#fff" if hollow else colour}" '
                             f'stroke="{colour}" stroke-width="1.5"/>{shown}',
                             f"{r.label} at {_t(r.end, tl.zone)} ({r.reference})", "point",
                             f'data-kind="{kind}" data-time="{r.end.isoformat()}" data-value="{r.value}"'))
    marks = {"consciousness": "L", "seizure": "Sz", "motor_weakness": "M", "cerebral_edema": "E"}
    for kind in ICANS_KINDS[2:]:
        for r in tl.readings.get(kind, []):
            x = c.x(r.end)
            c.add(_focusable(f'<rect x="{x - 9:.1f}" y="{y + score_h + 6}" width="18" height="16" fill="#fff" stroke="#333"/>'
                             f'<text x="{x:.1f}" y="{y + score_h + 18}" text-anchor="middle">{marks[kind]}</text>',
                             f"{r.label} at {_t(r.end, tl.zone)} ({r.reference})", "point",
                             f'data-kind="{kind}" data-time="{r.end.isoformat()}"'))
    c.y += h + GAP


def _axis(c: Canvas) -> None:
    tl = c.tl
    span = (c.end - c.start).total_seconds() / 3600
    step = 1 if span <= 24 else 6 if span <= 24 * 7 else 24
    local_start = c.start.astimezone(tl.zone).replace(minute=0, second=0, microsecond=0)
    moment = local_start
    top, bottom = 20, c.y
    while moment <= c.end:
        if moment >= c.start and (moment.hour % step == 0 if step < 24 else moment.hour == 0):
            x = c.x(moment)
            major = moment.hour == 0
            c.add(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="{"#888" if major else "#ddd"}" '
                  f'stroke-width="{1 if major else .6}"/>')
            label = moment.strftime("%d %b") if major else moment.strftime("%H:%M")
            every = 1 if c.px * 24 >= 48 else 2 if c.px * 48 >= 48 else 7  # day labels that do not overlap
            if (major and moment.toordinal() % every == 0) or (not major and c.px * step >= 30):
                c.add(f'<text x="{x + 2:.1f}" y="14" style="{"font-weight:700" if major else ""}">{label}</text>')
        moment += timedelta(hours=1)
    if tl.start:
        x = c.x(tl.start)
        c.add(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#000" stroke-dasharray="2 2"/>')
    x = c.x(c.end)
    c.add(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#000"/>'
          f'<text x="{x - 2:.1f}" y="{bottom + 12}" text-anchor="end" style="font-weight:700">now</text>')


def _svg(tl: Timeline) -> str:
    c = Canvas(tl)
    _grade_lane(c, "CRS", "crs")
    _grade_lane(c, "ICANS", "icans")
    temps = [(r.end, float(r.value), f"{r.label} at {_t(r.end, tl.zone)} ({r.reference})")
             for r in tl.readings.get("temperature", [])]
    _scale_lane(c, "Temperature °C", "temperatures", ROW["temperature"], 35.5, 41.0, [36.0, 38.0, 40.0], [(temps, "#d95f0e", "temperature", False)])
    sbp = [(r.end, float(r.value), f"{r.label} at {_t(r.end, tl.zone)} ({r.reference})") for r in tl.readings.get("sbp", [])]
    maps = [(t, v, f"MAP {v:g} mmHg at {_t(t, tl.zone)} ({ref})") for t, v, ref in tl.maps]
    _scale_lane(c, "SBP ● / MAP ○ mmHg", "bloodPressures", ROW["pressure"], 40, 180, [65, 90, 140],
                [(sbp, "#045a8d", "sbp", False), (maps, "#045a8d", "map", True)])
    _oxygen_lane(c)
    _pressor_lane(c)
    _dose_lane(c)
    _icans_domains_lane(c)
    _axis(c)
    height = c.y + 20
    defs = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            '<line x1="0" y1="0" x2="0" y2="6" stroke="#333" stroke-width="1.5" opacity=".45"/></pattern></defs>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" width="{c.width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {c.width:.0f} {height:.0f}" role="group" aria-label="CRS and ICANS course">{defs}'
            + "".join(c.parts) + "</svg>")


def _legend() -> str:
    items = [f'<span><i class="sw" style="background:{GRADE_FILL[g]}"></i>grade {g}</span>' for g in range(5)]
    items.append(f'<span><i class="sw" style="background:{NOT_GRADED}"></i>– not graded</span>')
    items.append('<span><i class="sw" style="background:repeating-linear-gradient(45deg,#fff,#fff 3px,#999 3px,#999 5px)">'
                 '</i>≥ at least (a source could not be read)</span>')
    items.append("<span><b>w</b>&nbsp;fever waived after tocilizumab/steroid/antipyretic</span>")
    return '<div class="legend">' + "".join(items) + "</div>"


def _missing_box(tl: Timeline) -> str:
    if not tl.missing:
        return ""
    rows = "".join(f'<li data-missing-part="{escape(key)}"><b>{escape(PARTS.get(key, key))}</b>: {escape(reason)}</li>'
                   for key, reason in sorted(tl.missing.items()))
    return (f'<section class="missing" role="alert"><h2>Part of the chart could not be read</h2><ul>{rows}</ul>'
            "<p>Lanes from these parts are marked missing; grades are shown as “at least” where a part "
            "could raise them.</p></section>")


def page(title: str, body: str, status_note: str = "") -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body>{status_note}{body}</body></html>")


def timeline_page(tl: Timeline, protocol_label: str) -> str:
    who = escape(tl.patient_name or f"Patient/{tl.patient_id}")
    head = f"<h1>CRS / ICANS course — {who}</h1>"
    if tl.start is None:
        body = (head + _missing_box(tl) + f'<p class="now" id="no-episode">No timeline: {escape(tl.no_episode_reason or "")}.</p>')
        return page("CRS/ICANS timeline", body)
    latest = tl.hours[-1]
    now_line = (f'<p class="now" id="current">Now ({_t(tl.now, tl.zone)}): <b>{escape(latest.crs.text)}</b> · '
                f'<b>{escape(latest.icans.text)}</b></p>')
    span = (f"From the first IEC infusion ({_t(tl.start, tl.zone)}) to now" if tl.view_start == tl.start
            else f"The last {tl.window_hours} hours (first IEC infusion {_t(tl.start, tl.zone)})")
    sub = (f'<p class="sub">{span}, {len(tl.hours)} hours; grades by the service\'s engine at each hour\'s end '
           f"({escape(protocol_label)}). Times in {tl.zone}.</p>")
    if tl.card_episode is not None and abs((tl.card_episode - tl.start).total_seconds()) > 60:
        sub += (f'<p class="now" id="other-episode">The card that opened this page graded the episode that began '
                f"{_t(tl.card_episode, tl.zone)}; this is the latest, begun {_t(tl.start, tl.zone)}.</p>")
    windows = ('<nav class="windows noprint">Show: '
               + " ".join(f'<a href="?{q}"{" aria-current=page" if (tl.window_hours or None) == h else ""}>{label}</a>'
                          for q, h, label in (("", None, "whole episode"), ("hours=72", 72, "last 72 h"),
                                              ("hours=24", 24, "last 24 h")))
               + "</nav>")
    tip = ('<p class="tip noprint">Hover or tab to a band or point to see the reading behind it. '
           "Print for the chart (landscape).</p>")
    return page("CRS/ICANS timeline", head + sub + _missing_box(tl) + now_line + _legend() + windows + tip
                + f"<figure>{_svg(tl)}</figure>")
