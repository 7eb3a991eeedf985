"""Plain words for an assessment: the one-line headline (grade first) and a text report."""
from __future__ import annotations

from .model import Assessment, Evidence, clock

SUMMARY_LIMIT = 139


def action_now(assessment: Assessment) -> str | None:
    """The one thing to do now, for the summary: an order due first, then the most urgent advice."""
    recs = {r.topic: r for r in assessment.recommendations}
    toci, steroid = recs.get("tocilizumab"), recs.get("corticosteroid")
    if toci and toci.order:
        return f"give tocilizumab {toci.order.dose_mg:g} mg IV now"
    if steroid and steroid.order:
        return f"{steroid.title.split(' ', 1)[0].lower()} {steroid.order.label}"
    if toci and toci.title.startswith("Tocilizumab due"):
        return "tocilizumab due: weigh the patient"
    if "refractory-crs" in recs:
        return "refractory CRS, consider anakinra or siltuximab"
    if "concurrent-icans" in recs:
        return "corticosteroids first, no tocilizumab"
    if steroid:
        title = steroid.title.split(" (", 1)[0].split(";", 1)[0]
        return title[0].lower() + title[1:]
    if "possible-masked-crs" in recs:
        return "possible masked CRS: evaluate"
    if toci:
        return toci.title.split(": ", 1)[-1].split(" if ", 1)[0] if toci.title.startswith("Tocilizumab:") \
            else toci.title[0].lower() + toci.title[1:]
    for topic in ("crs-management", "icans-management"):
        rec = recs.get(topic)
        if rec and rec.indicator == "critical":
            return "transfer to ICU"
    return None


def headline(assessment: Assessment) -> str:
    """Grade first, then the one action due now: 'CRS grade 3, no ICANS: give tocilizumab 560 mg IV now'
    (under 140 characters)."""
    if not assessment.in_scope:
        return f"Not assessed: {assessment.scope_reason}"[:SUMMARY_LIMIT]
    texts = [g.text for g in (assessment.crs, assessment.icans) if g.value is not None]
    grades = ", ".join(t if i == 0 or not t.startswith("No ") else "no " + t[3:] for i, t in enumerate(texts))
    action = action_now(assessment)
    text = f"{grades}: {action}" if action and grades else grades or action or ""
    return text if len(text) <= SUMMARY_LIMIT else text[:SUMMARY_LIMIT - 1].rstrip() + "…"


def _evidence_line(item: Evidence, tz=None, now=None) -> str:
    return f"    - {item.phrase(tz, now)} ({item.reference})"


def as_text(assessment: Assessment) -> str:
    tz = assessment.tz
    lines = [headline(assessment), f"Assessed at {clock(assessment.now, tz)} with {assessment.protocol}."]
    if assessment.in_scope:
        lines.append(f"IEC therapy: {assessment.scope_reason}.")
    for grade in (assessment.crs, assessment.icans):
        lines.append(f"{grade.text}: {grade.reason}." + (f" Window: {grade.window}." if grade.window else ""))
        lines += [_evidence_line(e, tz, assessment.now) for e in grade.evidence]
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
