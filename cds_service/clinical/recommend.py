"""What the protocol recommends for the grades: management, doses, and the pitfall rules.

Management follows decisions.md section 5; pitfalls 1, 2, 4, 5, 6 and 7 follow section 6 (the
order-related pitfalls 3, 8 and 9 live with the order checks). Every rule returns zero or more
Recommendations and names its source.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from .dosing import TocilizumabDose, TocilizumabHistory, tocilizumab_dose, tocilizumab_history
from .model import Grade, MedicationOrder, Recommendation
from .scope import Situation


@dataclass
class Plan:
    """What the rules decided together, so the rules that depend on each other agree."""

    crs: int
    icans: int
    dose: TocilizumabDose | None
    history: TocilizumabHistory
    concurrent_icans: bool
    tocilizumab_indicated: str | None  # why tocilizumab is indicated now, or None


def _doses(count: int) -> str:
    return f"{count} dose" if count == 1 else f"{count} doses"


def _urgency(grade: int) -> str:
    return "critical" if grade >= 3 else "warning" if grade == 2 else "info"


def _given_since_episode(s: Situation, category: str):
    return [d for d in s.facts.drugs_in(category) if s.episode.start <= d.start <= s.now]


# ---- CRS grade 1: when to consider tocilizumab -----------------------------------------------------

def crs1_tocilizumab_trigger(s: Situation) -> str | None:
    """When CRS is grade 1 and fever has lasted more than 3 days, or temperature >= 39 °C has
    lasted more than 10 h despite acetaminophen, then consider tocilizumab (significant
    comorbidity is the clinician's call).  Source: seed 000; decisions.md 5 (CRS 1)."""
    rules = s.protocol["crs_grade_1_tocilizumab_triggers"]
    threshold = s.protocol["fever_threshold_celsius"]
    temps = sorted((r for r in s.facts.of_kind("temperature") if s.episode.start <= r.end <= s.now),
                   key=lambda r: r.end)
    fevers = [r for r in temps if r.value >= threshold]
    if fevers and s.now - fevers[0].end > timedelta(days=rules["fever_days_over"]):
        return f"fever since {fevers[0].end:%Y-%m-%d %H:%M} UTC (over {rules['fever_days_over']} days)"
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


# ---- The plan --------------------------------------------------------------------------------------

def make_plan(s: Situation, crs: Grade, icans: Grade) -> Plan:
    crs_grade, icans_grade = crs.value or 0, icans.value or 0
    concurrent = concurrent_icans_applies(crs_grade, icans_grade)
    indicated = None
    if not concurrent:
        if crs_grade >= 2:
            indicated = f"CRS grade {crs_grade}"
        elif crs_grade == 1:
            trigger = crs1_tocilizumab_trigger(s)
            indicated = f"CRS grade 1 with {trigger}" if trigger else None
    return Plan(crs_grade, icans_grade, tocilizumab_dose(s), tocilizumab_history(s), concurrent, indicated)


def concurrent_icans_applies(crs_grade: int, icans_grade: int) -> bool:
    """When ICANS is grade >= 2 and CRS grade <= 1, then corticosteroids come first and no
    tocilizumab is suggested: tocilizumab may worsen neurotoxicity.  Source: seed 000;
    decisions.md 6 rule 1."""
    return icans_grade >= 2 and crs_grade <= 1


# ---- Management by grade ---------------------------------------------------------------------------

def crs_management(s: Situation, plan: Plan) -> list[Recommendation]:
    """When CRS is graded, then the protocol's management for that grade applies.
    Source: decisions.md 5 (per-grade sources in the protocol)."""
    if plan.crs == 0:
        return []
    entry = s.protocol["crs_management"][str(plan.crs)]
    detail = list(entry["steps"])
    if plan.crs == 1:
        triggers = s.protocol["crs_grade_1_tocilizumab_triggers"]
        detail.append(f"Tocilizumab only if fever > {triggers['fever_days_over']} days, T >= "
                      f"{triggers['high_fever_celsius']:g} °C for > {triggers['high_fever_hours_over']} h despite "
                      "acetaminophen, or significant comorbidity")
    if plan.crs == 2 and entry.get("steroid_when") == "hypotension_after_tocilizumab":
        regimen = s.protocol["steroid_regimens"][entry["steroid"]]
        detail.append(f"If hypotension persists after 1-2 tocilizumab doses: {regimen['text']}")
    return [Recommendation("crs-management", _urgency(plan.crs), f"CRS grade {plan.crs} management",
                           detail, entry["source"])]


def icans_management(s: Situation, plan: Plan) -> list[Recommendation]:
    """When ICANS is graded, then the protocol's management for that grade applies.
    Source: decisions.md 5; seed 003."""
    if plan.icans == 0:
        return []
    entry = s.protocol["icans_management"][str(plan.icans)]
    return [Recommendation("icans-management", _urgency(plan.icans), f"ICANS grade {plan.icans} management",
                           list(entry["steps"]), entry["source"])]


def tocilizumab(s: Situation, plan: Plan) -> list[Recommendation]:
    """When tocilizumab is indicated (CRS >= 2, or CRS 1 with a trigger) and no dose limit is
    reached and a weight from the last 30 days exists, then give 8 mg/kg (12 mg/kg under 30 kg),
    max 800 mg. Without a weight: no number, ask for one. At a limit: say why, no order.
    Source: decisions.md 5."""
    if plan.tocilizumab_indicated is None:
        return []
    rules = s.protocol["tocilizumab"]
    history = plan.history
    given = (f"Tocilizumab given this episode: {_doses(len(history.episode_doses))}, "
             f"{len(history.doses_24h)} in the last 24 h.")
    if history.blocked:
        detail = [f"Dose limit reached: {history.blocked}.", given]
        if history.next_allowed and not history.at_episode_limit:
            detail.append(f"Next dose allowed from {history.next_allowed:%Y-%m-%d %H:%M} UTC.")
        detail.append("See refractory options.")
        return [Recommendation("tocilizumab", "warning", "Tocilizumab not suggested: dose limit reached",
                               detail, rules["source"])]
    if plan.dose is None:
        return [Recommendation("tocilizumab", "warning", "Tocilizumab indicated: no weight in the last "
                               f"{s.protocol['weight_window_days']} days, weigh the patient",
                               [f"Indication: {plan.tocilizumab_indicated}.",
                                "No dose is computed without a documented weight.", given], rules["source"])]
    dose = plan.dose
    order = MedicationOrder("tocilizumab", dose.dose_mg, "IV", None,
                            f"tocilizumab {dose.dose_mg:g} mg {rules['route']}")
    detail = [f"Indication: {plan.tocilizumab_indicated}.",
              f"Dose {dose.text}; weight {dose.weight.value:g} kg at {dose.weight.end:%Y-%m-%d %H:%M} UTC.",
              f"Repeat no sooner than every {rules['min_hours_between_doses']} h if no improvement; at most "
              f"{rules['max_doses_per_24h']} doses in 24 h and {rules['max_doses_per_episode']} per episode.",
              given]
    if plan.icans >= 2:
        detail.append("Concurrent ICANS: give corticosteroids too; do not wait for tocilizumab to act.")
    return [Recommendation("tocilizumab", "warning", f"Give tocilizumab {dose.dose_mg:g} mg IV", detail,
                           rules["source"], order, [dose.weight.evidence()])]


def corticosteroid(s: Situation, plan: Plan, crs: Grade) -> list[Recommendation]:
    """When CRS is grade 3-4, ICANS grade 2-4, or CRS grade 2 with hypotension persisting after
    tocilizumab, then the strongest corticosteroid regimen any of them calls for is suggested
    (axicabtagene ciloleucel or brexucabtagene autoleucel at CRS 3: consider methylprednisolone
    1000 mg daily).  Source: decisions.md 5; seeds 000, 001, 003."""
    regimens = s.protocol["steroid_regimens"]
    reasons: list[tuple[str, str]] = []
    crs_entry = s.protocol["crs_management"].get(str(plan.crs)) if plan.crs else None
    if crs_entry and crs_entry.get("steroid"):
        if crs_entry.get("steroid_when") != "hypotension_after_tocilizumab":
            reasons.append((crs_entry["steroid"], f"CRS grade {plan.crs} [{crs_entry['source']}]"))
        elif crs.components.get("hypotension", 0) >= 2 and plan.history.episode_doses:
            reasons.append((crs_entry["steroid"], f"CRS grade {plan.crs}: hypotension persists after "
                                                   f"{_doses(len(plan.history.episode_doses))} of tocilizumab "
                                                   f"[{crs_entry['source']}]"))
    icans_entry = s.protocol["icans_management"].get(str(plan.icans)) if plan.icans else None
    if icans_entry and icans_entry.get("steroid"):
        reasons.append((icans_entry["steroid"], f"ICANS grade {plan.icans} [{icans_entry['source']}]"))
    if not reasons:
        return []
    chosen = max(reasons, key=lambda r: regimens[r[0]]["rank"])[0]
    regimen = regimens[chosen]
    detail = [f"Regimen: {regimen['text']}."] + [f"For {why}: {regimens[key]['text']}." for key, why in reasons]
    if crs_entry and crs_entry.get("early_steroid_product_steroid") and s.episode.has_early_steroid_product():
        alternative = regimens[crs_entry["early_steroid_product_steroid"]]
        detail.append(f"Axicabtagene ciloleucel or brexucabtagene autoleucel: consider {alternative['text']} "
                      f"[{crs_entry['source']}].")
    if plan.crs >= 2 and plan.icans >= 2:
        detail.append("CRS and ICANS together: give tocilizumab and corticosteroids; steroids do not wait.")
    detail.append("Continue until grade 1 or less, then taper. Start antifungal prophylaxis.")
    order = MedicationOrder(regimen["drug"], regimen["dose_mg"], regimen["route"], regimen["every_hours"],
                            regimen["text"])
    verb = "Start" if not _given_since_episode(s, "systemic-corticosteroids") else "Continue or escalate to"
    return [Recommendation("corticosteroid", "warning", f"{verb} {regimen['drug']} {regimen['dose_mg']:g} mg "
                           f"{regimen['route']} every {regimen['every_hours']} h", detail,
                           "; ".join(sorted({why.split('[')[-1].rstrip(']') for _, why in reasons})), order)]


def refractory(s: Situation, plan: Plan) -> list[Recommendation]:
    """When tocilizumab dose limits are reached while it is indicated, or CRS stays grade >= 3
    despite tocilizumab and corticosteroids, then move to refractory options: anakinra,
    siltuximab; then ruxolitinib, cyclophosphamide, antithymocyte globulin.
    Source: seeds 000-003; decisions.md 5 (refractory)."""
    options = s.protocol["refractory_options"]
    reason = None
    if plan.tocilizumab_indicated and plan.history.blocked:
        reason = f"tocilizumab dose limit reached ({plan.history.blocked})"
    elif plan.crs >= 3 and plan.history.episode_doses and _given_since_episode(s, "systemic-corticosteroids"):
        reason = f"CRS grade {plan.crs} despite tocilizumab and corticosteroids"
    if reason is None:
        return []
    return [Recommendation("refractory-crs", "critical", "Refractory CRS: consider anakinra or siltuximab",
                           [f"Why: {reason}.", "First: " + ", ".join(options["first"]) + ".",
                            "Then: " + ", ".join(options["then"]) + "."], options["source"])]


# ---- Pitfalls --------------------------------------------------------------------------------------

def concurrent_icans(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 1. When ICANS is grade >= 2 and CRS grade <= 1, then corticosteroids first
    (dexamethasone 10 mg IV q6h) and no tocilizumab suggestion.  Source: seed 000; decisions.md 6."""
    if not plan.concurrent_icans:
        return []
    regimen = s.protocol["steroid_regimens"][s.protocol["icans_management"][str(plan.icans)]["steroid"]]
    return [Recommendation("concurrent-icans", "warning",
                           f"ICANS grade {plan.icans} with CRS grade {plan.crs}: steroids first, no tocilizumab",
                           [f"Give corticosteroids ({regimen['text']}) rather than tocilizumab: "
                            "tocilizumab may worsen neurotoxicity [seed 000].",
                            "ASCO and NCCN allow tocilizumab with caution when CRS is also present."],
                           "seed 000; crs-cds protocol rule 1")]


def fever_masked(s: Situation, crs: Grade) -> list[Recommendation]:
    """Pitfall 2. When the fever waiver applies, then say the grade is driven by hypotension or
    hypoxia because antipyretic or anti-cytokine therapy was given (name it and its time).
    Source: ASTCT footnote; decisions.md 6 rule 2."""
    flag = next((f for f in crs.flags if f.code == "fever-masked"), None)
    if flag is None:
        return []
    return [Recommendation("fever-masked", "info", "Fever masked by treatment: grade from hypotension/hypoxia",
                           [flag.text], "ASTCT 2019; crs-cds protocol rule 2", evidence=list(flag.evidence))]


def possible_masked_crs(s: Situation, crs: Grade) -> list[Recommendation]:
    """When hypotension or hypoxia is present without a qualifying fever, then no CRS grade but a
    warning: possible CRS masked by prophylaxis or another cause.  Source: decisions.md 3."""
    flag = next((f for f in crs.flags if f.code == "possible-masked-crs"), None)
    if flag is None:
        return []
    return [Recommendation("possible-masked-crs", "warning", "Possible CRS masked by prophylaxis or another "
                           "cause: evaluate", [flag.text], "crs-cds protocol: prophylaxis is not a waiver",
                           evidence=list(flag.evidence))]


def tocilizumab_delay(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 4. When CRS is grade >= 2 and no tocilizumab was given in the last 12 h (and no
    dose limit forbids it), then the card is critical: delay raises risk.
    Source: seed 000 (each 12 h delay raised cardiotoxicity 1.7-fold); decisions.md 6 rule 4."""
    if plan.crs < 2 or plan.history.blocked:
        return []
    since = s.window_start("tocilizumab_delay")
    if any(d.start >= since for d in plan.history.episode_doses):
        return []
    last = plan.history.last
    title = (f"CRS grade {plan.crs}, last tocilizumab {last.start:%Y-%m-%d %H:%M} UTC: repeat, do not delay" if last
             else f"CRS grade {plan.crs} without tocilizumab: do not delay")
    return [Recommendation("tocilizumab-delay", "critical", title,
                           [f"No tocilizumab in the {s.window_text('tocilizumab_delay')}; "
                            f"{s.protocol['tocilizumab_delay_risk_text']} [{s.protocol['tocilizumab_delay_source']}]."],
                           s.protocol["tocilizumab_delay_source"])]


def antifungal_prophylaxis(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 5. When the patient received corticosteroids after the IEC therapy, then recommend
    antifungal prophylaxis.  Source: seeds 000-003, NCCN, ASCO; decisions.md 6 rule 5."""
    given = _given_since_episode(s, "systemic-corticosteroids")
    if not given:
        return []
    last = given[-1]
    return [Recommendation("antifungal-prophylaxis", "info", "On corticosteroids: start antifungal prophylaxis",
                           [f"{last.agent} given {last.start:%Y-%m-%d %H:%M} UTC after the IEC therapy."],
                           "seeds 000-003; crs-cds protocol rule 5", evidence=[last.evidence()])]


def infection_workup(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 6. When CRS is graded (fever or treated fever), then fever cannot tell CRS from
    sepsis: cultures and chest X-ray, and CRS treatment does not wait for them.
    Source: seeds 000-002; decisions.md 6 rule 6."""
    if plan.crs == 0:
        return []
    return [Recommendation("infection-workup", "info", "Rule out infection; do not delay CRS treatment",
                           ["Blood and urine cultures, chest X-ray; empiric antibiotics if neutropenic.",
                            "Do not wait for results before treating CRS [seed 001]."],
                           "seeds 000-002; crs-cds protocol rule 6")]


def hlh_mas(s: Situation, plan: Plan) -> list[Recommendation]:
    """Pitfall 7. When ferritin exceeds 10,000 ng/mL after the IEC therapy, then flag possible
    IEC-associated HLH/MAS: check organ toxicity; tocilizumab and corticosteroids together from the
    outset.  Source: seed 000; MGH White Book; decisions.md 6 rule 7."""
    limit = s.protocol["hlh_ferritin_above_ng_per_ml"]
    high = [r for r in s.facts.of_kind("ferritin") if r.value > limit and s.episode.start <= r.end <= s.now]
    if not high:
        return []
    peak = max(high, key=lambda r: r.value)
    return [Recommendation("hlh-mas", "warning", f"Ferritin {peak.value:g} ng/mL: possible HLH/MAS",
                           [f"Ferritin above {limit:,} ng/mL ({peak.value:g} at {peak.end:%Y-%m-%d %H:%M} UTC).",
                            "Check for grade >= 3 liver, kidney or lung toxicity and hemophagocytosis.",
                            "If HLH/MAS: tocilizumab and corticosteroids together from the outset."],
                           "seed 000; crs-cds protocol rule 7", evidence=[peak.evidence()])]


def recommend(s: Situation, crs: Grade, icans: Grade) -> list[Recommendation]:
    plan = make_plan(s, crs, icans)
    rules = [
        *crs_management(s, plan),
        *icans_management(s, plan),
        *concurrent_icans(s, plan),
        *tocilizumab(s, plan),
        *tocilizumab_delay(s, plan),
        *corticosteroid(s, plan, crs),
        *refractory(s, plan),
        *possible_masked_crs(s, crs),
        *fever_masked(s, crs),
        *hlh_mas(s, plan),
        *infection_workup(s, plan),
        *antifungal_prophylaxis(s, plan),
    ]
    return rules
