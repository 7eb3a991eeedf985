"""What the protocol recommends for the grades: management, doses, and the pitfall rules.

Management follows decisions.md section 5; pitfalls 1, 2, 4, 5, 6, 7, 10 and 11 follow section 6
(the order-related pitfalls 3, 8 and 9 live with the order checks). Every rule returns zero or
more Recommendations and names its source: the literature by its authors, a choice of the
protocol by the protocol's name, version and rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .crs import low_map, pressure_kind, sbp_threshold
from .dosing import (
    SteroidDose, TocilizumabDose, TocilizumabHistory, is_child, levetiracetam_text, refractory_first_options,
    steroid_dose, tocilizumab_dose, tocilizumab_history,
)
from .model import DrugEvent, Grade, MedicationOrder, Reading, Recommendation
from .scope import Situation


@dataclass
class Plan:
    """What the rules decided together, so the rules that depend on each other agree."""

    crs: int
    icans: int
    crs_graded: bool
    dose: TocilizumabDose | None
    history: TocilizumabHistory
    concurrent_icans: bool
    tocilizumab_indicated: str | None  # why tocilizumab is indicated now, or None
    hlh: Reading | None

    @property
    def tocilizumab_due(self) -> bool:
        """Indicated, not withheld, no dose in the last 8 h and no limit reached (decisions.md 5)."""
        return self.tocilizumab_indicated is not None and not self.history.blocked


def _doses(count: int) -> str:
    return f"{count} dose" if count == 1 else f"{count} doses"


def _rec(s: Situation, topic: str, indicator: str, title: str, detail: list[str], sources, rule: str | None = None,
         **extra) -> Recommendation:
    """A recommendation citing its literature (with links) and, for a protocol choice, the rule."""
    source = s.protocol.cite(sources)
    if rule:
        source += f"; {s.protocol.rule(rule)}"
    return Recommendation(topic, indicator, title, detail, source, links=s.protocol.links(sources), **extra)


def treatment_steroids(s: Situation) -> list[DrugEvent]:
    """Corticosteroids given for CRS or ICANS: after the first fever of the episode, or while ICANS
    is documented, and never premedication given in the 24 h before an IEC dose (required for
    T-cell engagers).  Source: decisions.md 6 rule 5 (rev. 2)."""
    threshold = s.protocol["fever_threshold_celsius"]
    fevers = [r.end for r in s.facts.of_kind("temperature") if r.value >= threshold and s.episode.start <= r.end]
    first_fever = min(fevers, default=None)
    icans_since = [r.end for kind in ("ice", "capd", "consciousness", "seizure", "motor_weakness", "cerebral_edema")
                   for r in s.facts.of_kind(kind) if _abnormal(s, r)]
    first_icans = min(icans_since, default=None)
    premedication = timedelta(hours=s.protocol["windows_hours"]["prophylaxis_before_therapy"])
    given = []
    for d in s.facts.drugs_in("systemic-corticosteroids"):
        if not (s.episode.start - premedication <= d.start <= s.now):
            continue
        if any(timedelta(0) <= a.start - d.start <= premedication for a in s.episode.administrations):
            continue  # premedication before an IEC dose
        if (first_fever and d.start > first_fever) or (first_icans and d.start >= first_icans):
            given.append(d)
    return sorted(given, key=lambda d: d.start)


def _abnormal(s: Situation, reading: Reading) -> bool:
    icans = s.protocol["icans"]
    value = reading.value
    if reading.kind == "ice":
        return value < 10
    if reading.kind == "capd":
        return value >= 1
    if reading.kind == "motor_weakness":
        return bool(value)
    table = {"consciousness": icans["consciousness_grades"], "seizure": icans["seizure_grades"],
             "cerebral_edema": icans["cerebral_edema_grades"]}[reading.kind]
    return table.get(value, 0) > 0


# ---- CRS grade 1: when tocilizumab is indicated ------------------------------------------------------

def crs1_tocilizumab_trigger(s: Situation) -> str | None:
    """When CRS is grade 1 and fever has lasted more than 3 days (febrile every day of it), or
    temperature >= 39 °C has lasted more than 10 h despite acetaminophen, then tocilizumab is
    indicated (significant comorbidity is the clinician's call).  Source: ASCO 2021; NCCN; decisions.md 5 (CRS 1)."""
    rules = s.protocol["crs_grade_1_tocilizumab_triggers"]
    threshold = s.protocol["fever_threshold_celsius"]
    temps = sorted((r for r in s.facts.of_kind("temperature") if s.episode.start <= r.end <= s.now),
                   key=lambda r: r.end)
    fevers = [r for r in temps if r.value >= threshold]
    # The fever's present course: back from the latest fever, while no day (the fever window) passes
    # without one. A fever that ended days ago and a new one now are two courses, not one.
    if fevers:
        course_start = fevers[-1].end
        for earlier in reversed(fevers[:-1]):
            if course_start - earlier.end > s.protocol.window("fever"):
                break
            course_start = earlier.end
        if s.now - course_start > timedelta(days=rules["fever_days_over"]):
            return f"fever since {s.at(course_start)} (over {rules['fever_days_over']} days)"
    acetaminophen = [d.start for d in s.facts.drugs_in("antipyretics") if d.agent == "acetaminophen"]
    if acetaminophen:
        run_start = None
        for reading in (r for r in temps if r.end >= min(acetaminophen)):
            if reading.value < rules["high_fever_celsius"]:
                run_start = None
                continue
            run_start = run_start or reading.end
            if reading.end - run_start > timedelta(hours=rules["high_fever_hours_over"]):
                return (f"temperature >= {rules['high_fever_celsius']:g} °C for over "
                        f"{rules['high_fever_hours_over']} h despite acetaminophen")
    return None


def hlh_ferritin(s: Situation) -> Reading | None:
    """When ferritin exceeds 10,000 ng/mL after the IEC therapy, then possible IEC-associated
    HLH/MAS (the peak is the evidence).  Source: Neelapu et al. 2018; decisions.md 6 rule 7."""
    limit = s.protocol["hlh"]["ferritin_above_ng_per_ml"]
    high = [r for r in s.facts.of_kind("ferritin") if r.value > limit and s.episode.start <= r.end <= s.now]
    return max(high, key=lambda r: r.value, default=None)


# ---- The plan --------------------------------------------------------------------------------------

def make_plan(s: Situation, crs: Grade, icans: Grade) -> Plan:
    crs_grade, icans_grade = crs.value or 0, icans.value or 0
    crs_graded = crs.value is not None
    concurrent = crs_graded and concurrent_icans_applies(s, crs_grade, icans_grade)
    hlh = hlh_ferritin(s)
    indicated = None
    if not concurrent:
        if crs_grade >= 2:
            indicated = f"CRS grade {crs_grade}"
        elif crs_grade == 1:
            trigger = crs1_tocilizumab_trigger(s)
            if trigger:
                indicated = f"CRS grade 1 with {trigger}"
            elif hlh is not None:
                indicated = "CRS with possible HLH/MAS"
    return Plan(crs_grade, icans_grade, crs_graded, tocilizumab_dose(s), tocilizumab_history(s), concurrent,
                indicated, hlh)


def concurrent_icans_applies(s: Situation, crs_grade: int, icans_grade: int) -> bool:
    """When ICANS is grade >= 2 and CRS was graded 0 or 1, then corticosteroids come first and no
    tocilizumab is suggested: tocilizumab may worsen neurotoxicity.  Source: Neelapu et al. 2018;
    decisions.md 6 rules 1 and 11."""
    rule = s.protocol["concurrent_icans"]
    return icans_grade >= rule["icans_from_grade"] and crs_grade <= rule["crs_up_to_grade"]


# ---- Management by grade ---------------------------------------------------------------------------

ICU = "ICU"


def crs_management(s: Situation, plan: Plan, crs: Grade) -> list[Recommendation]:
    """When CRS is graded, then the protocol's management for that grade applies; a T-cell
    engager's next dose is held from CRS 2 (blinatumomab: interrupted at CRS 3, stopped at 4).
    Source: ASCO 2021; NCCN; product labels; decisions.md 5 and 6 rule 10."""
    if plan.crs == 0:
        return []
    entry = s.protocol["crs_management"][str(plan.crs)]
    detail = ([ICU] if entry.get("icu") else []) + list(entry["steps"])
    if plan.crs == 1 and plan.tocilizumab_indicated is None and not plan.concurrent_icans:
        triggers = s.protocol["crs_grade_1_tocilizumab_triggers"]
        detail.append(f"Tocilizumab if fever lasts > {triggers['fever_days_over']} days, T >= "
                      f"{triggers['high_fever_celsius']:g} °C for > {triggers['high_fever_hours_over']} h despite "
                      "acetaminophen, or significant comorbidity")
    if entry.get("steroid_when") == "hypotension_after_tocilizumab" and not _steroid_reasons(s, plan, crs):
        detail.append(f"If hypotension persists after 1-2 tocilizumab doses: {steroid_dose(s, entry['steroid']).text}")
    detail += bispecific_hold(s, plan)
    indicator = "critical" if entry.get("icu") else "warning" if plan.crs >= 2 else "info"
    return [_rec(s, "crs-management", indicator, f"CRS {plan.crs}", detail, entry["source"])]


def bispecific_hold(s: Situation, plan: Plan) -> list[str]:
    """When CRS is grade >= 2 after a T-cell engager, then hold its next step-up or treatment dose
    until CRS resolves; blinatumomab: interrupt the infusion at CRS 3, stop it at CRS 4.
    Source: product labels; decisions.md 6 rule 10."""
    rules = s.protocol["bispecific_hold"]
    latest = s.episode.latest
    if plan.crs < rules["from_crs_grade"] or "t-cell-engagers" not in latest.categories:
        return []
    if latest.agent == "blinatumomab" and plan.crs >= rules["blinatumomab_stop_grade"]:
        return ["Stop the blinatumomab infusion (CRS grade 4: product label)"]
    if latest.agent == "blinatumomab" and plan.crs >= rules["blinatumomab_interrupt_grade"]:
        return ["Interrupt the blinatumomab infusion until CRS resolves (product label)"]
    return [f"Hold the next {latest.agent} step-up or treatment dose until CRS resolves (product label)"]


def _intubated(s: Situation) -> bool:
    return any(r.value == 4 and pressure_kind(r) == "invasive" for r in s.readings("o2_device", "oxygen"))


def icans_management(s: Situation, plan: Plan) -> list[Recommendation]:
    """When ICANS is graded, then the care of every grade up to it applies (cumulative): from grade
    1 ICE assessment every 12 h, aspiration precautions, no CNS depressants, levetiracetam; from 2
    neurology consult, EEG and MRI; from 3 ICU and repeat imaging; at 4, airway protection unless
    already ventilated, status epilepticus and cerebral edema care when those are documented.
    Source: ASCO 2021; NCCN; decisions.md 5 (rev. 2, ICANS)."""
    if plan.icans == 0:
        return []
    table = s.protocol["icans_management"]
    detail: list[str] = []
    if any(table[str(g)].get("icu") for g in range(1, plan.icans + 1)):
        detail.append(ICU)
    for grade in range(1, plan.icans + 1):
        entry = table[str(grade)]
        detail += entry["steps"]
        if entry.get("levetiracetam"):
            detail.append(levetiracetam_text(s))
    if plan.icans >= 4:
        entry = table["4"]
        if not _intubated(s):
            detail += entry.get("not_ventilated_steps", [])
        if any(r.value == "seizure-prolonged" for r in s.readings("seizure", "icans")):
            detail += entry.get("status_epilepticus_steps", [])
        edema = s.protocol["icans"]["cerebral_edema_grades"]
        if any(edema.get(r.value, 0) >= 4 for r in s.readings("cerebral_edema", "icans")):
            detail += entry.get("cerebral_edema_steps", [])
    entry = table[str(plan.icans)]
    indicator = "critical" if entry.get("icu") else "warning" if plan.icans >= 2 else "info"
    return [_rec(s, "icans-management", indicator, f"ICANS {plan.icans}", detail, entry["source"])]


def background(s: Situation, plan: Plan) -> list[Recommendation]:
    """When CRS or ICANS is graded, then two background lines: grade at least twice daily and at
    any change; do not delay tocilizumab or corticosteroids for efficacy concerns.
    Source: ASCO 2021; Neelapu et al. 2018; decisions.md 8."""
    if plan.crs == 0 and plan.icans == 0:
        return []
    rules = s.protocol["background"]
    lines = [rules["grading_frequency"]]
    if plan.crs >= 2 or plan.icans >= 2 or plan.tocilizumab_indicated:
        lines.append(rules["no_delay_for_efficacy"])
    return [_rec(s, "background", "info", "Also", lines, rules["source"])]


def tocilizumab(s: Situation, plan: Plan) -> list[Recommendation]:
    """When tocilizumab is indicated (CRS >= 2, or CRS 1 with a trigger) and due (no dose in the
    last 8 h, no limit reached) and a weight from the last 30 days exists, then give 8 mg/kg
    (12 mg/kg under 30 kg), max 800 mg. No weight: the rule, no number. Inside 8 h of the last
    dose: when the next is possible, no order. At a limit: which limit, no order. Under 2 years:
    off-label.  Source: Actemra prescribing information; decisions.md 5 (rev. 2)."""
    if plan.tocilizumab_indicated is None:
        return []
    rules = s.protocol["tocilizumab"]
    history = plan.history
    given = ([f"Given this episode: {_doses(len(history.episode_doses))} ({len(history.doses_24h)} in 24 h), "
              f"last {s.at(history.last.start)}."] if history.episode_doses else [])
    young = []
    if s.age is not None and s.age[0] < rules["approved_from_age_years"]:
        young = [f"Under {rules['approved_from_age_years']} years: tocilizumab for CRS is approved from "
                 f"{rules['approved_from_age_years']} years (off-label below)."]
    limits = (f"Repeat after {rules['min_hours_between_doses']} h if no improvement (max "
              f"{rules['max_doses_per_24h']}/24 h, {rules['max_doses_per_episode']}/episode).")
    source = rules["source"]
    if history.limit:
        rule = "tocilizumab.max_doses_per_episode" if history.at_episode_limit else "tocilizumab.max_doses_per_24h"
        return [_rec(s, "tocilizumab", "warning", f"No more tocilizumab: limit reached ({history.limit})",
                     given + young, source, rule)]
    if history.next_possible:
        title = (f"Tocilizumab: last dose {s.at(history.last.start)}; next dose possible from "
                 f"{s.at(history.next_possible)} if no improvement")
        count = [f"Given this episode: {_doses(len(history.episode_doses))} ({len(history.doses_24h)} in 24 h)."]
        return [_rec(s, "tocilizumab", "warning", title, count + young, source,
                     "tocilizumab.min_hours_between_doses")]
    urgent = "critical" if plan.crs >= 2 else "warning"
    if plan.dose is None:
        rule = (f"Dose {rules['mg_per_kg']:g} mg/kg ({rules['mg_per_kg_low_weight']:g} mg/kg under "
                f"{rules['low_weight_below_kg']:g} kg), max {rules['max_dose_mg']:g} mg, {rules['route']}.")
        return [_rec(s, "tocilizumab", urgent, f"Tocilizumab due ({plan.tocilizumab_indicated}): weigh the patient",
                     [f"No weight in the last {s.protocol['weight_window_days']} days, so no dose is computed. "
                      + rule] + young + given, source)]
    dose = plan.dose
    order = MedicationOrder("tocilizumab", dose.dose_mg, "IV", None, f"tocilizumab {dose.dose_mg:g} mg {rules['route']}")
    cap = f", capped at {rules['max_dose_mg']:g} mg" if dose.capped else ""
    # CRS 1: the trigger that was met, never the conditional rule (decisions.md 5, CRS 1).
    why = f"Tocilizumab indicated: {plan.tocilizumab_indicated}. " if plan.crs < 2 else ""
    detail = [f"{why}{dose.mg_per_kg:g} mg/kg x {dose.weight.value:g} kg ({s.at(dose.weight.end)}) = "
              f"{dose.unrounded_mg:g} mg{cap}; {rules['route']}.", limits] + young + given
    return [_rec(s, "tocilizumab", urgent, f"Give tocilizumab {dose.dose_mg:g} mg IV now", detail, source,
                 "tocilizumab.mg_per_kg", order=order, evidence=[dose.weight.evidence()])]


def _steroid_reasons(s: Situation, plan: Plan, crs: Grade | None) -> list[tuple[str, str]]:
    """(regimen, why) for every finding that calls for a corticosteroid now."""
    reasons: list[tuple[str, str]] = []
    crs_entry = s.protocol["crs_management"].get(str(plan.crs)) if plan.crs else None
    if crs_entry and crs_entry.get("steroid"):
        if crs_entry.get("steroid_when") != "hypotension_after_tocilizumab":
            reasons.append((crs_entry["steroid"], f"CRS grade {plan.crs}"))
        elif (crs is not None and crs.components.get("hypotension", 0) >= 2 and plan.history.episode_doses
              and hypotension_since(s, plan.history.episode_doses[-1].start)):
            reasons.append((crs_entry["steroid"], f"CRS grade {plan.crs} with hypotension after "
                                                  f"{_doses(len(plan.history.episode_doses))} of tocilizumab"))
    icans_entry = s.protocol["icans_management"].get(str(plan.icans)) if plan.icans else None
    if icans_entry and icans_entry.get("steroid"):
        reasons.append((icans_entry["steroid"], f"ICANS grade {plan.icans}"))
    if plan.hlh is not None and plan.crs >= 1:
        reasons.append((s.protocol["hlh"]["steroid"], "possible HLH/MAS"))
    return reasons


def hypotension_since(s: Situation, moment: datetime) -> bool:
    """Whether hypotension persists after ``moment`` (a tocilizumab dose): a systolic pressure
    below the age threshold, a documented low MAP, or a vasopressor running, charted after it.
    Source: decisions.md 5 (CRS 2: dexamethasone if hypotension persists after tocilizumab)."""
    threshold, _, _ = sbp_threshold(s)
    low = [r for r in s.readings("sbp", "hypotension") if r.value < threshold] + low_map(s)
    pressors = s.drugs("vasopressors", moment) + s.drugs("vasopressin", moment)
    return any(r.end > moment for r in low) or any(d.end > moment for d in pressors)


def running_regimen(s: Situation, chosen: str) -> tuple[SteroidDose, DrugEvent] | None:
    """When a regimen at least as strong as the one recommended (by the protocol's rank) is being
    given, then continue it and order nothing: a regimen is being given when its drug was given at
    its dose or more, the last dose within its interval (plus ``steroid_regimen_grace_hours``) and,
    when an earlier dose was given, the two no further apart. The regimen to continue is, per drug,
    the one the doses match most closely, and of those the strongest; a weaker one running gets
    the escalation as an order.
    Source: decisions.md 5 (rev. 2, orders are bounded and never duplicated)."""
    regimens = s.protocol["steroid_regimens"]
    grace = timedelta(hours=s.protocol["steroid_regimen_grace_hours"])
    given = sorted(s.facts.drugs_in("systemic-corticosteroids"), key=lambda d: d.start)
    found = []
    for key, regimen in regimens.items():
        if regimen["rank"] < regimens[chosen]["rank"]:
            continue
        dose = steroid_dose(s, key)
        if dose.dose_mg is None:
            continue
        interval = timedelta(hours=dose.every_hours) + grace
        doses = [d for d in given if d.agent == dose.drug and d.start <= s.now
                 and (d.dose_mg or 0) >= dose.dose_mg - 1e-6]
        if not doses or s.now - doses[-1].start > interval:
            continue
        if len(doses) >= 2 and doses[-1].start - doses[-2].start > interval:
            continue  # given less often than this regimen
        found.append((regimen["rank"], dose, doses[-1]))
    # Per drug, the regimen the doses given match most closely (a single 1000 mg methylprednisolone
    # dose is "1000 mg daily", not "500 mg every 12 h"); of those, the strongest.
    closest: dict[str, tuple] = {}
    for rank, dose, last in found:
        if dose.drug not in closest or (dose.dose_mg, rank) > (closest[dose.drug][1].dose_mg, closest[dose.drug][0]):
            closest[dose.drug] = (rank, dose, last)
    if not closest:
        return None
    _, dose, last = max(closest.values(), key=lambda item: item[0])
    return dose, last


def corticosteroid(s: Situation, plan: Plan, crs: Grade) -> list[Recommendation]:
    """When CRS is grade 3-4, ICANS grade 2-4, possible HLH/MAS with CRS, or CRS grade 2 with
    hypotension persisting after tocilizumab, then the strongest corticosteroid regimen any of
    them calls for (axicabtagene ciloleucel or brexucabtagene autoleucel at CRS 3: consider
    methylprednisolone 1000 mg daily). The CRS 4 order runs 3 days, its taper in words. When the
    regimen is already given, "continue", no order.  Source: ASCO 2021; NCCN; decisions.md 5."""
    regimens = s.protocol["steroid_regimens"]
    reasons = _steroid_reasons(s, plan, crs)
    if not reasons:
        return []
    chosen = max(reasons, key=lambda r: regimens[r[0]]["rank"])[0]
    dose = steroid_dose(s, chosen)
    # Why, when it is more than the headline's grade says (several reasons, or HLH).
    detail = (["For " + ", ".join(why.replace(" grade ", " ") for _, why in reasons) + "."]
              if len(reasons) > 1 or plan.hlh is not None or plan.crs == 2 else [])
    if dose.after_text:
        detail.append(dose.after_text[0].upper() + dose.after_text[1:] + ".")
    crs_entry = s.protocol["crs_management"].get(str(plan.crs)) if plan.crs else None
    if crs_entry and crs_entry.get("early_steroid_product_steroid") and s.episode.has_early_steroid_product():
        alternative = steroid_dose(s, crs_entry["early_steroid_product_steroid"])
        detail.append(f"Axi-cel or brexu-cel: consider {alternative.text}.")
    if plan.crs >= 2 and plan.icans >= 2:
        detail.append("With CRS and ICANS, steroids do not wait for tocilizumab.")
    if not dose.after_text:
        detail.append("Continue until grade <= 1, then taper.")
    sources = sorted({src for key, _ in reasons for src in _regimen_sources(s, plan, key)})
    indicator = "critical" if max(plan.crs, plan.icans) >= 3 else "warning"
    running = running_regimen(s, chosen)
    if dose.order is not None and dose.order.text != dose.text:
        detail.insert(0, dose.text[len(dose.order.text):].strip(" ()") + ".")  # the pediatric computation
    rule = f"steroid_regimens.{chosen}"
    if running is not None:
        continued, last = running
        text = continued.order.text if continued.order is not None else continued.text
        return [_rec(s, "corticosteroid", indicator, f"Continue {text}",
                     [f"{last.label} given {s.at(last.start)}."] + detail, sources,
                     f"steroid_regimens.{continued.key}", evidence=[last.evidence()])]
    if dose.order is None:
        return [_rec(s, "corticosteroid", indicator, f"Corticosteroid: {dose.text}", detail, sources, rule)]
    verb = "Start" if not treatment_steroids(s) else "Escalate to"
    return [_rec(s, "corticosteroid", indicator, f"{verb} {dose.order.text}", detail, sources, rule,
                 order=dose.order)]


def _regimen_sources(s: Situation, plan: Plan, key: str) -> list[str]:
    sources = ["asco"]
    if s.protocol["steroid_regimens"][key].get("pediatric_mg_per_kg") and is_child(s) is not False:
        sources.append(s.protocol["pediatric"]["source"])
    return sources


def refractory(s: Situation, plan: Plan) -> list[Recommendation]:
    """When a tocilizumab limit is reached while CRS >= 2, or CRS >= 3 now with the first
    tocilizumab of the episode given more than 24 h ago and a corticosteroid for CRS started more
    than 24 h ago, then CRS is refractory: anakinra or siltuximab, then ruxolitinib,
    cyclophosphamide, antithymocyte globulin with the CAR-T team (for a child, anakinra at the
    pediatric protocol's dose: the adult fixed dose is not given). Inside 8 h of a dose is timing,
    not refractory.  Source: ASCO 2021; NCCN; decisions.md 5 (rev. 2, refractory CRS)."""
    options = s.protocol["refractory_options"]
    reason = None
    history = plan.history
    if plan.crs >= 2 and history.limit:
        reason = f"tocilizumab limit reached ({history.limit})"
    elif plan.crs >= 3 and history.episode_doses:
        first = history.episode_doses[0]
        steroids = treatment_steroids(s)
        if (s.now - first.start > timedelta(hours=options["first_tocilizumab_hours"]) and steroids
                and s.now - steroids[0].start > timedelta(hours=options["steroid_for_crs_hours"])):
            reason = (f"CRS grade {plan.crs} more than {options['first_tocilizumab_hours']} h after the first "
                      f"tocilizumab ({s.at(first.start)}) and corticosteroids ({s.at(steroids[0].start)})")
    if reason is None:
        return []
    return [_rec(s, "refractory-crs", "critical", "Refractory CRS: anakinra or siltuximab",
                 [f"Why: {reason}.",
                  "First: " + " or ".join(refractory_first_options(s.protocol, s)) + ".",
                  "Then: " + ", ".join(options["then"]) + f": {options['then_text']}."],
                 options["source"], "refractory_options")]


# ---- Pitfalls --------------------------------------------------------------------------------------

def concurrent_icans(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 1. When ICANS is grade >= 2 and CRS was graded 0 or 1, then corticosteroids first
    and no tocilizumab suggestion. With no CRS grade there is no such card (rule 11): the ICANS
    advice stays in the main card.  Source: Neelapu et al. 2018; decisions.md 6 rules 1 and 11."""
    if not plan.concurrent_icans:
        return []
    crs_text = "no CRS" if plan.crs == 0 else f"CRS grade {plan.crs}"
    return [_rec(s, "concurrent-icans", "warning",
                 f"ICANS grade {plan.icans} with {crs_text}: corticosteroids first, no tocilizumab",
                 ["Tocilizumab may worsen neurotoxicity; the corticosteroid treats ICANS.",
                  "ASCO and NCCN allow tocilizumab with caution when CRS is also present."],
                 s.protocol["concurrent_icans"]["source"], "concurrent_icans")]


def fever_masked(s: Situation, crs: Grade) -> list[Recommendation]:
    """Pitfall 2. When the fever waiver applies, then say the grade is driven by hypotension or
    hypoxia because antipyretic or anti-cytokine therapy was given (name it and its time).
    Source: Lee et al. 2019 (ASTCT footnote); decisions.md 6 rule 2."""
    flag = next((f for f in crs.flags if f.code == "fever-masked"), None)
    if flag is None:
        return []
    return [_rec(s, "fever-masked", "info", "Fever masked by treatment",
                 [flag.text], "astct", evidence=list(flag.evidence))]


def possible_masked_crs(s: Situation, crs: Grade) -> list[Recommendation]:
    """When hypotension or hypoxia is present without a qualifying fever, then no CRS grade but a
    warning: possible CRS masked by prophylaxis or another cause.  Source: Lee et al. 2019;
    decisions.md 3 (prophylaxis is not a waiver)."""
    flag = next((f for f in crs.flags if f.code == "possible-masked-crs"), None)
    if flag is None:
        return []
    return [_rec(s, "possible-masked-crs", "warning", "No CRS grade (no fever): possible CRS masked by "
                 "prophylaxis or another cause, evaluate", [flag.text], "astct", "windows_hours.prophylaxis_before_therapy",
                 evidence=list(flag.evidence))]


def tocilizumab_delay(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 4. When CRS is grade >= 2 and no tocilizumab was given in the last 12 h (and no
    limit forbids it), then the card is critical: delay raises risk.
    Source: Alvi et al., JACC 2019 (each 12 h delay, 1.7-fold cardiovascular events); decisions.md 6 rule 4."""
    if plan.crs < 2 or plan.history.limit:
        return []
    since = s.window_start("tocilizumab_delay")
    if any(d.start >= since for d in plan.history.episode_doses):
        return []
    last = plan.history.last
    title = (f"CRS grade {plan.crs}, last tocilizumab {s.at(last.start)}: do not delay the next dose" if last
             else f"CRS grade {plan.crs} without tocilizumab: do not delay")
    return [_rec(s, "tocilizumab-delay", "critical", title,
                 [f"No tocilizumab in the {s.window_text('tocilizumab_delay')}: "
                  f"{s.protocol['tocilizumab_delay_risk_text']}."],
                 s.protocol["tocilizumab_delay_source"])]


def antifungal_prophylaxis(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 5. When the patient received corticosteroids for CRS or ICANS (after the first
    fever, or with ICANS documented; not a T-cell engager's premedication in the 24 h before its
    dose), then recommend antifungal prophylaxis.  Source: ASCO 2021; NCCN; decisions.md 6 rule 5."""
    given = treatment_steroids(s)
    if not given:
        return []
    last = given[-1]
    return [_rec(s, "antifungal-prophylaxis", "info", "Antifungal prophylaxis",
                 [f"{last.agent} for CRS/ICANS given {s.at(last.start)}."],
                 s.protocol["antifungal"]["source"], evidence=[last.evidence()])]


def infection_workup(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 6. When CRS is graded (fever or treated fever), then fever cannot tell CRS from
    sepsis: cultures and chest X-ray, and CRS treatment does not wait for them.
    Source: ASCO 2021; NCCN; decisions.md 6 rule 6."""
    if plan.crs == 0:
        return []
    return [_rec(s, "infection-workup", "info", "Infection",
                 ["rule out sepsis, pneumonia, fluid overload (cultures, chest X-ray; antibiotics if neutropenic) "
                  "without delaying CRS treatment"],
                 s.protocol["infection_source"])]


def hlh_mas(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 7. When ferritin exceeds 10,000 ng/mL after the IEC therapy, then flag possible
    IEC-associated HLH/MAS: check organ toxicity; tocilizumab and corticosteroids together from the
    outset (dexamethasone 10 mg IV q6h unless the grade calls for more; weight-based for children).
    Source: Neelapu et al. 2018; decisions.md 6 rule 7."""
    peak = plan.hlh
    if peak is None:
        return []
    rules = s.protocol["hlh"]
    regimen = steroid_dose(s, rules["steroid"]).text
    return [_rec(s, "hlh-mas", "warning", f"Ferritin {peak.value:g} ng/mL: possible HLH/MAS",
                 [f"Ferritin above {rules['ferritin_above_ng_per_ml']:,} ng/mL ({s.at(peak.end)}); check for grade "
                  ">= 3 liver, kidney or lung toxicity and hemophagocytosis.",
                  f"If HLH/MAS: tocilizumab and corticosteroids together from the outset ({regimen}, unless the "
                  "grade calls for more)."],
                 rules["source"], "hlh", evidence=[peak.evidence()])]


def _label_once(s: Situation, recs: list[Recommendation]) -> list[Recommendation]:
    """The pediatric label in full the first time, "pediatric weight-based" after (nothing twice)."""
    label = s.protocol["pediatric"]["label"]
    seen = False
    for r in recs:
        for i, line in enumerate(r.detail):
            if label in line:
                if seen:
                    r.detail[i] = line.replace(label, "pediatric weight-based")
                seen = True
    return recs


def recommend(s: Situation, crs: Grade, icans: Grade) -> list[Recommendation]:
    plan = make_plan(s, crs, icans)
    return _label_once(s, [
        *tocilizumab(s, plan),
        *corticosteroid(s, plan, crs),
        *crs_management(s, plan, crs),
        *icans_management(s, plan),
        *concurrent_icans(s, plan),
        *tocilizumab_delay(s, plan),
        *refractory(s, plan),
        *possible_masked_crs(s, crs),
        *fever_masked(s, crs),
        *hlh_mas(s, plan),
        *infection_workup(s, plan),
        *antifungal_prophylaxis(s, plan),
        *background(s, plan),
    ])
