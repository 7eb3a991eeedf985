"""CRS grade by the ASTCT 2019 consensus (decisions.md sections 2-3; reference.md section 1).

Grade = the more severe of the hypotension tier and the hypoxia tier, provided fever is present
or waived; grade 1 = fever with neither. Each rule below returns its tier with the facts behind it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from .model import DrugEvent, Evidence, Flag, Grade, Reading
from .scope import Situation

ASTCT = "ASTCT 2019 (Lee et al., BBMT 2019;25:625-638)"
WAIVER_CATEGORIES = ("antipyretics", "anti-cytokine-therapies", "systemic-corticosteroids")


@dataclass
class Tier:
    """A CRS component (hypotension or hypoxia) at an ASTCT grade, with its evidence."""

    grade: int
    text: str
    evidence: list[Evidence] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)


# ---- Fever ---------------------------------------------------------------------------------------

def fever_in_window(s: Situation) -> Reading | None:
    """When any body temperature in the last 24 h is >= 38.0 °C (100.4 °F),
    then fever is present; the highest reading is the evidence.  Source: ASTCT; decisions.md 2."""
    threshold = s.protocol["fever_threshold_celsius"]
    fevers = [r for r in s.readings("temperature", "fever") if r.value >= threshold]
    return max(fevers, key=lambda r: (r.value, r.end)) if fevers else None


def fever_waiver(s: Situation) -> tuple[Reading, DrugEvent] | None:
    """When a fever >= 38.0 °C was documented after the IEC therapy and, after that fever, an
    antipyretic or anti-cytokine therapy (tocilizumab, siltuximab, anakinra, any systemic
    corticosteroid) was given, then fever is no longer required for grades 2-4.
    Source: ASTCT footnote; decisions.md 3 (fever waiver)."""
    threshold = s.protocol["fever_threshold_celsius"]
    fevers = sorted((r for r in s.facts.of_kind("temperature")
                     if r.value >= threshold and s.episode.start <= r.end <= s.now), key=lambda r: r.end)
    if not fevers:
        return None
    first_fever = fevers[0]
    treatments = sorted((d for category in WAIVER_CATEGORIES for d in s.facts.drugs_in(category)
                         if first_fever.end < d.start <= s.now), key=lambda d: d.start)
    return (first_fever, treatments[0]) if treatments else None


def prophylaxis_before_fever(s: Situation) -> list[DrugEvent]:
    """Antipyretic or anti-cytokine therapy given around the IEC therapy (from 24 h before it, to
    catch premedication) but before any fever: prophylaxis, which does not waive fever
    (decisions.md 3)."""
    threshold = s.protocol["fever_threshold_celsius"]
    fever_times = [r.end for r in s.facts.of_kind("temperature") if r.value >= threshold and r.end >= s.episode.start]
    first_fever = min(fever_times, default=None)
    since = s.episode.start - s.protocol.window("prophylaxis_before_therapy")
    return sorted((d for category in WAIVER_CATEGORIES for d in s.facts.drugs_in(category)
                   if since <= d.start <= s.now and (first_fever is None or d.start < first_fever)),
                  key=lambda d: d.start)


# ---- Hypotension -----------------------------------------------------------------------------------

def sbp_threshold(s: Situation) -> tuple[float, str, list[Flag]]:
    """When the patient is under 28 days old, then hypotension is SBP < 60 mmHg; 28 days to
    under 1 year, < 70 (PALS); 1-10 years, < 70 + 2 x age; over 10 years and adults, < 90.
    Source: decisions.md 3 (age thresholds); Mahadeo et al. 2019 (1-10 years); PALS (under 1 year)."""
    flags: list[Flag] = []
    if s.age is None:
        flags.append(Flag("age-unknown", "Age unknown (no birth date): the adult hypotension threshold "
                                         "(SBP < 90 mmHg) was used."))
        row = s.protocol["hypotension_sbp_thresholds"][-1]
        return row["sbp_below_mmhg"], s.protocol.cite(row["source"]), flags
    years, days = s.age
    for row in s.protocol["hypotension_sbp_thresholds"]:
        if "below_age_days" in row and days >= row["below_age_days"]:
            continue
        if "below_age_years" in row and years >= row["below_age_years"]:
            continue
        threshold = row["sbp_below_mmhg"] + row.get("plus_per_year_of_age", 0) * years
        if years < 1:
            flags.append(Flag("infant-threshold", f"Under 1 year: hypotension threshold SBP < {threshold:g} mmHg "
                                                  "follows PALS (ASTCT gives none for infants)."))
        return threshold, s.protocol.cite(row["source"]), flags
    raise ValueError("protocol hypotension thresholds have no catch-all row")


def vasopressors_at_peak(s: Situation) -> tuple[int, list[DrugEvent]]:
    """The largest number of vasopressors running at the same time in the window.

    When norepinephrine, epinephrine, phenylephrine or dopamine run together, each distinct agent
    counts; vasopressin never adds to the count, but vasopressin alone counts as one vasopressor.
    Dose does not matter.  Source: ASTCT ("1 vasopressor with or without vasopressin"; "multiple
    vasopressors excluding vasopressin"); decisions.md 3."""
    since = s.window_start("vasopressors")
    running = s.drugs("vasopressors", since) + s.drugs("vasopressin", since)
    best: tuple[int, list[DrugEvent]] = (0, [])
    for moment in sorted({max(d.start, since) for d in running}):
        active = [d for d in running if d.running_at(moment)]
        agents = {d.agent for d in active if "vasopressors" in d.categories}
        count = len(agents) or (1 if active else 0)
        if (count, len(active)) > (best[0], len(best[1])):
            best = (count, active)
    return best


def _infusion_evidence(s: Situation, d: DrugEvent) -> Evidence:
    """"norepinephrine running since 14:05", or for an infusion that has ended, "phenylephrine
    stopped 12:00; started at 10:00": a stopped infusion is never said to be running."""
    if d.end < s.now or d.status in ("completed", "stopped"):
        return d.evidence(f"{d.agent} stopped {s.at(d.end)}; started" if d.end > d.start else d.agent)
    return d.evidence(f"{d.agent} running", when="since")


def low_map(s: Situation) -> list[Reading]:
    """When a patient over 10 years (or of unknown age, read as an adult) has a documented mean
    arterial pressure (LOINC 8478-0) below 65 mmHg in the window, then it counts as hypotension
    like SBP < 90. A MAP is never computed from SBP and DBP.  Source: decisions.md 3 (rev. 2,
    mean arterial pressure)."""
    rules = s.protocol["mean_arterial_pressure"]
    if s.age is not None and s.age[0] <= rules["over_age_years"]:
        return []
    return [r for r in s.readings("map", "hypotension") if r.value < rules["below_mmhg"]]


def hypotension_tier(s: Situation) -> Tier:
    """When more than one vasopressor (excluding vasopressin) runs at once, then grade 4; when one
    vasopressor (with or without vasopressin) runs, grade 3; when SBP falls below the age
    threshold (or, over 10 years, a documented MAP below 65 mmHg) without vasopressors, grade 2.
    Source: ASTCT table; decisions.md 3."""
    count, agents = vasopressors_at_peak(s)
    flags = inotrope_flags(s)
    threshold, threshold_source, age_flags = sbp_threshold(s)
    flags += age_flags
    if count:
        evidence = [_infusion_evidence(s, d) for d in agents]
        if count >= 2:
            return Tier(4, f"{count} vasopressors at once (vasopressin not counted)", evidence, flags)
        with_vasopressin = any("vasopressin" in d.categories for d in agents)
        text = "1 vasopressor" + (" with vasopressin" if with_vasopressin and len(agents) > 1 else "")
        return Tier(3, text, evidence, flags)
    low = [r for r in s.readings("sbp", "hypotension") if r.value < threshold]
    if low:
        lowest = min(low, key=lambda r: r.value)
        text = f"hypotension without vasopressors (SBP {lowest.value:g} < {threshold:g} mmHg, {threshold_source})"
        return Tier(2, text, [lowest.evidence()], flags)
    maps = low_map(s)
    if maps:
        lowest = min(maps, key=lambda r: r.value)
        limit = s.protocol["mean_arterial_pressure"]["below_mmhg"]
        return Tier(2, f"hypotension without vasopressors (MAP {lowest.value:g} < {limit:g} mmHg)",
                    [lowest.evidence()], flags)
    return Tier(0, "no hypotension", [], flags)


def inotrope_flags(s: Situation) -> list[Flag]:
    """When dobutamine or milrinone runs, then it does not count as a vasopressor, and the card
    flags it for review.  Source: decisions.md 3 (inotropes); reference.md edge case 17."""
    inotropes = s.drugs("inotropes", s.window_start("vasopressors"))
    if not inotropes:
        return []
    names = ", ".join(sorted({d.agent for d in inotropes}))
    return [Flag("inotrope-running", f"Inotrope running ({names}): not counted as a vasopressor; review.",
                 tuple(d.evidence() for d in inotropes))]


# ---- Hypoxia ---------------------------------------------------------------------------------------

def _flow_tier(s: Situation, flow: float) -> int:
    if flow <= 0:
        return 0
    return 2 if flow <= s.protocol["oxygen"]["low_flow_max_l_per_min"] else 3


def oxygen_tier(s: Situation, icans_grade: int | None) -> Tier:
    """When positive pressure (CPAP, BiPAP, NIV, intubation) is documented in the window, then
    grade 4; high-flow nasal cannula > 6 L/min, face mask, non-rebreather or Venturi, grade 3;
    nasal cannula <= 6 L/min or blow-by, grade 2. For nasal cannulas the documented flow decides
    over the device label; a flow with no device is graded by flow alone. Worst in the window: a
    later room-air reading does not erase an earlier tier.  Source: ASTCT; decisions.md 3."""
    devices = [d for d in s.readings("o2_device", "oxygen") if d.value > 0]
    devices, home_flags = home_positive_pressure(s, devices)
    flows = s.readings("o2_flow", "oxygen")
    tolerance = s.protocol["oxygen"]["device_flow_pairing_minutes"] * 60
    explained: set[int] = set()
    candidates: list[Tier] = []
    for device in devices:
        near = [f for f in flows if abs((f.end - device.end).total_seconds()) <= tolerance]
        explained.update(id(f) for f in near)
        paired = min(near, key=lambda f: abs((f.end - device.end).total_seconds()), default=None)
        if device.flow_decides and paired is not None:
            tier = _flow_tier(s, paired.value)
            flags = []
            if tier != device.value:
                flags.append(Flag("device-flow-mismatch",
                                  f"{device.label} documented at {paired.value:g} L/min: graded by flow "
                                  f"as {'low' if tier == 2 else 'high' if tier == 3 else 'no'} flow.",
                                  (device.evidence(), paired.evidence())))
            candidates.append(Tier(tier, f"{device.label.split(': ', 1)[-1]} at {paired.value:g} L/min",
                                   [device.evidence(), paired.evidence()], flags))
        else:
            candidates.append(Tier(device.value, device.label.split(": ", 1)[-1], [device.evidence()]))
    for flow in flows:
        if id(flow) not in explained and flow.value > 0:
            candidates.append(Tier(_flow_tier(s, flow.value), f"oxygen at {flow.value:g} L/min (no device documented)",
                                   [flow.evidence()]))
    if not candidates:
        return Tier(0, "no supplemental oxygen", [], home_flags)
    worst = max(candidates, key=lambda t: t.grade)
    flags = [f for t in candidates for f in t.flags] + home_flags
    if worst.grade == 4:
        flags += positive_pressure_flags(s, icans_grade)
    return Tier(worst.grade, worst.text, worst.evidence, flags)


PRESSURE_KINDS = (("niv", ("non-invasive", "noninvasive", "niv", "nippv")),
                  ("invasive", ("intubat", "ventilator", "mechanical ventilation", "endotracheal", "ett",
                                "invasive", "artificial respiration")),
                  ("bipap", ("bipap", "bi-pap", "bilevel", "bi-level", "dual pressure")),
                  ("cpap", ("cpap", "continuous positive")))
PRESSURE_RANK = {"cpap": 1, "bipap": 2, "niv": 2, "invasive": 3}


def pressure_kind(device: Reading) -> str:
    """Which kind of positive pressure a device reading names: cpap, bipap, niv or invasive."""
    name = device.label.split(": ", 1)[-1].lower()
    words = set(name.replace("(", " ").replace(")", " ").replace("/", " ").split())
    for kind, needles in PRESSURE_KINDS:
        if any((n in words) if len(n) <= 4 else (n in name) for n in needles):
            return kind
    return "niv"


def home_positive_pressure(s: Situation, devices: list[Reading]) -> tuple[list[Reading], list[Flag]]:
    """When CPAP or BiPAP was documented in the 7 days before the first IEC administration, then
    that is the patient's baseline (sleep apnea): the same kind of device after the therapy does
    not count toward grade 4, and the card says so; a different, higher kind (CPAP at home, now
    BiPAP or intubation) counts.  Source: decisions.md 3 (rev. 2, home positive pressure);
    reference.md edge case 19."""
    since = s.episode.start - timedelta(days=s.protocol["home_positive_pressure_days_before"])
    home = [d for d in s.facts.of_kind("o2_device")
            if d.value == 4 and since <= d.end < s.episode.start and pressure_kind(d) in ("cpap", "bipap")]
    if not home:
        return devices, []
    baseline = max(PRESSURE_RANK[pressure_kind(d)] for d in home)
    kept, flags = [], []
    for device in devices:
        if device.value == 4 and device.start >= s.episode.start and PRESSURE_RANK[pressure_kind(device)] <= baseline:
            name = "BiPAP" if pressure_kind(device) == "bipap" else "CPAP"
            if not flags:
                flags.append(Flag("home-positive-pressure",
                                  f"{name} also charted before the therapy (home {name}?): not counted; "
                                  "if it is now for hypoxia, this is grade 4.",
                                  (device.evidence(), max(home, key=lambda d: d.end).evidence())))
            continue
        kept.append(device)
    return kept, flags


def positive_pressure_flags(s: Situation, icans_grade: int | None) -> list[Flag]:
    """When positive pressure counts while ICANS is grade >= 3, then it still grades CRS 4 (the
    safer error) but the card flags that it may be airway protection.
    Source: decisions.md 3; reference.md edge case 18."""
    flags = []
    if icans_grade is not None and icans_grade >= 3:
        flags.append(Flag("airway-protection", "Positive pressure with ICANS grade >= 3 may be airway protection: "
                                               "counted as CRS grade 4; review."))
    return flags


def attribution_flags(drivers: list[Tier]) -> list[Flag]:
    """When hypotension or hypoxia drives the grade, then remind that ASTCT counts them only when
    no other cause explains them (sepsis, pneumonia, fluid overload): the engine cannot tell, the
    clinician can.  Source: ASTCT ("not attributable to any other cause"); reference.md edge case 15."""
    if not drivers:
        return []
    return [Flag("attribution", "Rule out another cause (sepsis, pneumonia, fluid overload).")]


# ---- The grade -------------------------------------------------------------------------------------

def grade_crs(s: Situation, icans_grade: int | None) -> Grade:
    """When fever (>= 38.0 °C in 24 h) is present, then CRS grade = max(1, hypotension tier,
    hypoxia tier). When fever is waived (fever after the IEC therapy, then antipyretic or
    anti-cytokine therapy), grades 2-4 follow hypotension/hypoxia alone. Without fever or a
    waiver there is no CRS grade; hypotension or hypoxia then raises a warning flag.
    Source: ASTCT 2019; decisions.md 3."""
    window = (f"fever: {s.window_text('fever')}; hypotension, vasopressors and oxygen: "
              f"{s.window_text('hypotension')}")
    hypotension = hypotension_tier(s)
    hypoxia = oxygen_tier(s, icans_grade)
    severity = max(hypotension.grade, hypoxia.grade)
    drivers = [t for t in (hypotension, hypoxia) if t.grade == severity and severity > 0]
    evidence = [e for t in drivers for e in t.evidence]
    flags = hypotension.flags + hypoxia.flags + attribution_flags(drivers)
    components = {"hypotension": hypotension.grade, "hypoxia": hypoxia.grade}
    grade = _grade_from_fever(s, severity, drivers, evidence, flags, window)
    grade.components = components
    return grade


def _grade_from_fever(s: Situation, severity: int, drivers: list[Tier], evidence: list[Evidence],
                      flags: list[Flag], window: str) -> Grade:
    fever = fever_in_window(s)
    if fever:
        value = max(1, severity)
        reason = f"fever {fever.value:g} °C" + "".join(f" with {t.text}" for t in drivers)
        return Grade("CRS", value, reason, ASTCT, window, [fever.evidence()] + evidence, flags)
    waiver = fever_waiver(s)
    if waiver and severity >= 2:
        first_fever, treatment = waiver
        flags.append(Flag("fever-masked",
                          f"{treatment.agent} given {s.at(treatment.start)} after fever {first_fever.value:g} °C: fever "
                          "no longer required, grade from " + " and ".join(t.text for t in drivers) + ".",
                          (first_fever.evidence(), treatment.evidence())))
        reason = " and ".join(t.text for t in drivers) + " (fever waived after treatment)"
        return Grade("CRS", severity, reason, ASTCT + "; fever waiver", window, evidence, flags)
    if waiver:
        return Grade("CRS", 0, "no active CRS criteria (afebrile after treatment, no hypotension or hypoxia)",
                     ASTCT, window, [], flags)
    if severity >= 2:
        prophylaxis = prophylaxis_before_fever(s)
        given = (" after prophylactic " + ", ".join(sorted({d.agent for d in prophylaxis}))) if prophylaxis else ""
        flags.append(Flag("possible-masked-crs",
                          "Possible CRS masked by prophylaxis or another cause; evaluate: "
                          + " and ".join(t.text for t in drivers) + f" without fever in the {s.window_text('fever')}{given}.",
                          tuple(evidence) + tuple(d.evidence() for d in prophylaxis)))
        return Grade("CRS", 0, "no fever: no CRS grade (hypotension/hypoxia present, see warning)", ASTCT,
                     window, evidence, flags)
    return Grade("CRS", 0, "no fever in the last 24 h", ASTCT, window, [], flags)

