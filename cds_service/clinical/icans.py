"""ICANS grade by the ASTCT 2019 consensus (decisions.md section 4; reference.md section 2).

The grade is the worst domain in the window: ICE score (CAPD under 12 years), level of
consciousness, seizure, deep focal motor weakness, raised ICP / cerebral edema. Tremor, myoclonus
and intracranial hemorrhage do not grade ICANS, so no rule reads them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import Evidence, Flag, Grade, Reading
from .scope import Situation

ASTCT = "ASTCT 2019 ICANS (Lee et al., BBMT 2019;25:625-638)"


@dataclass
class Domain:
    name: str
    grade: int
    reading: Reading


def _worst(domain: str, readings: list[Reading], grade_of) -> Domain | None:
    graded = [Domain(domain, grade_of(r.value), r) for r in readings]
    return max(graded, key=lambda d: (d.grade, d.reading.end), default=None)


def ice_grade(s: Situation, score: int) -> int:
    """When the ICE score is 7-9, then grade 1; 3-6, grade 2; 0-2, grade 3 (ICE 0 while
    unarousable is grade 4 through the consciousness domain).  Source: ASTCT ICANS table."""
    for row in s.protocol["icans"]["ice_score_grades"]:
        if row["min"] <= score <= row["max"]:
            return row["grade"]
    raise ValueError(f"ICE score {score} outside 0-10")


def capd_grade(s: Situation, score: int) -> int:
    """When a child's CAPD score is >= 9, then grade 3; 1-8, at least grade 1 (grade 2 comes
    from awakening only to voice).  Source: ASTCT pediatric ICANS; ASCO 2021; decisions.md 4."""
    for row in s.protocol["icans"]["capd_score_grades"]:
        if score >= row["min"]:
            return row["grade"]
    return 0


def uses_capd_only(s: Situation) -> bool:
    """When the patient is under 12 years old, then CAPD replaces the ICE score.  Source: ASTCT;
    decisions.md 4. (Age unknown: the ICE score is used.)"""
    return s.age is not None and s.age[0] < s.protocol["icans"]["capd_age_below_years"]


def sedation_running(s: Situation) -> list:
    """When a sedative (propofol, midazolam, dexmedetomidine...) ran in the window, then depressed
    consciousness is attributable to it and does not grade ICANS; the card flags it.
    Source: ASTCT ("not attributable to any other cause, e.g. sedation"); reference.md edge case 25."""
    return s.drugs("sedatives", s.window_start("sedation"))


def grade_icans(s: Situation) -> Grade:
    """When any ICANS domain is abnormal in the last 12 h, then the ICANS grade is the worst
    domain grade.  Source: ASTCT 2019 ICANS table; decisions.md 4."""
    icans = s.protocol["icans"]
    window = f"ICANS assessments: {s.window_text('icans')}"
    flags: list[Flag] = []
    domains: list[Domain | None] = []
    ice_readings = s.readings("ice", "icans")
    if uses_capd_only(s):
        if ice_readings:
            flags.append(Flag("ice-under-12", "ICE score not used under 12 years: ASTCT grades children by CAPD.",
                              tuple(r.evidence() for r in ice_readings)))
    else:
        domains.append(_worst("ICE score", ice_readings, lambda v: ice_grade(s, v)))
    domains.append(_worst("CAPD", s.readings("capd", "icans"), lambda v: capd_grade(s, v)))
    sedatives = sedation_running(s)
    consciousness = s.readings("consciousness", "icans")
    if sedatives and consciousness:
        names = ", ".join(sorted({d.agent for d in sedatives}))
        flags.append(Flag("sedation", f"Sedation ({names}): consciousness not used for the grade; reassess off "
                                      "sedation.",
                          tuple(d.evidence() for d in sedatives)))
    else:
        domains.append(_worst("consciousness", consciousness, icans["consciousness_grades"].__getitem__))
    domains.append(_worst("seizure", s.readings("seizure", "icans"), icans["seizure_grades"].__getitem__))
    domains.append(_worst("motor", s.readings("motor_weakness", "icans"),
                          lambda v: icans["motor_weakness_grade"] if v else 0))
    domains.append(_worst("cerebral edema", s.readings("cerebral_edema", "icans"),
                          icans["cerebral_edema_grades"].__getitem__))
    assessed = [d for d in domains if d is not None]
    if not assessed:
        flags.append(Flag("no-icans-assessment", f"No ICANS assessment (ICE/CAPD, consciousness) documented in the "
                                                 f"{s.window_text('icans')}: assess."))
        return Grade("ICANS", 0, "no ICANS findings documented", ASTCT, window, [], flags)
    grade = max(d.grade for d in assessed)
    deciding = [d for d in assessed if d.grade == grade and grade > 0]
    evidence: list[Evidence] = [d.reading.evidence() for d in deciding]
    evidence += [d.reading.evidence() for d in assessed if d not in deciding and d.grade > 0]
    if grade == 0:
        return Grade("ICANS", 0, "ICANS domains normal", ASTCT, window, [d.reading.evidence() for d in assessed], flags)
    reason = "; ".join(f"{d.reading.label}" for d in deciding)
    return Grade("ICANS", grade, reason, ASTCT, window, evidence, flags)
