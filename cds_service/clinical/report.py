"""Plain words for an assessment: the one-line headline (grade first) and a text report."""
from __future__ import annotations

from .model import Assessment, Evidence

SUMMARY_LIMIT = 139


def _action(assessment: Assessment) -> list[str]:
    actions = []
    for rec in assessment.recommendations:
        if rec.order and rec.topic == "tocilizumab":
            actions.append(f"give tocilizumab {rec.order.dose_mg:g} mg")
        elif rec.order and rec.topic == "corticosteroid":
            actions.append(f"{rec.title.split(' ', 1)[0].lower()} {rec.order.agent} {rec.order.dose_mg:g} mg "
                           f"q{rec.order.every_hours}h")
        elif rec.topic == "concurrent-icans":
            actions.append("no tocilizumab")
        elif rec.topic == "refractory-crs":
            actions.append("refractory: consider anakinra/siltuximab")
        elif rec.topic == "tocilizumab" and not rec.order:
            actions.append("tocilizumab: " + rec.title.split(": ", 1)[-1])
        elif rec.topic == "possible-masked-crs":
            actions.append("possible masked CRS, evaluate")
    return actions


def headline(assessment: Assessment) -> str:
    """'CRS grade 3, ICANS grade 1: give tocilizumab 560 mg, start dexamethasone 10 mg q6h' (< 140 chars)."""
    if not assessment.in_scope:
        return f"Not assessed: {assessment.scope_reason}"[:SUMMARY_LIMIT]
    grades = ", ".join(g.text for g in (assessment.crs, assessment.icans) if g.value is not None)
    text = grades
    for action in _action(assessment):
        candidate = f"{text}{': ' if text == grades else ', '}{action}"
        if len(candidate) > SUMMARY_LIMIT:
            break
        text = candidate
    return text


def _evidence_line(item: Evidence) -> str:
    return f"    - {item.sentence} ({item.reference})"


def as_text(assessment: Assessment) -> str:
    lines = [headline(assessment), f"Assessed at {assessment.now:%Y-%m-%d %H:%M} UTC with {assessment.protocol}."]
    if assessment.in_scope:
        lines.append(f"IEC therapy: {assessment.scope_reason}.")
    for grade in (assessment.crs, assessment.icans):
        lines.append(f"{grade.text}: {grade.reason}." + (f" Window: {grade.window}." if grade.window else ""))
        lines += [_evidence_line(e) for e in grade.evidence]
        lines += [f"    ! {flag.text}" for flag in grade.flags]
        if grade.at_least:
            lines.append("    ! Some data could not be read; the grade may be higher:")
            lines += [f"      - {m}" for m in grade.missing]
    if assessment.recommendations:
        lines.append("Recommendations:")
    for rec in assessment.recommendations:
        lines.append(f"  [{rec.indicator}] {rec.title} ({rec.source})")
        lines += [f"    - {d}" for d in rec.detail]
    if assessment.unreadable and not assessment.in_scope:
        lines.append("Could not read:")
        lines += [f"  - {u.reference}: {u.reason}" for u in assessment.unreadable]
    return "\n".join(lines)
