"""Properties: more support never lowers a grade, and the order of resources never matters."""
from __future__ import annotations

import random
from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.clinical import assess
from cds_service.scenarios import (
    BIPAP_MASK, BLOW_BY, HFNC, NASAL_CANNULA, NON_REBREATHER, NOREPINEPHRINE, PHENYLEPHRINE, ROOM_AIR,
    SCENARIOS, VASOPRESSIN, YESCARTA, Chart, Drug,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
DEVICES = [ROOM_AIR, BLOW_BY, NASAL_CANNULA, HFNC, NON_REBREATHER, BIPAP_MASK]
PRESSORS = [NOREPINEPHRINE, PHENYLEPHRINE, VASOPRESSIN, Drug("epinephrine infusion", "vasopressors", "3992"),
            Drug("dopamine infusion", "vasopressors", "3628")]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

temperature = st.floats(min_value=35.0, max_value=41.5).map(lambda t: round(t, 1))
hours = st.floats(min_value=0.1, max_value=11.5).map(lambda h: round(h, 2))
oxygen = st.lists(st.tuples(st.sampled_from(range(len(DEVICES))), st.floats(0, 60).map(lambda f: round(f, 1)),
                            hours), max_size=3)
pressors = st.lists(st.tuples(st.sampled_from(range(len(PRESSORS))), hours), max_size=3)
sbps = st.lists(st.tuples(st.integers(60, 140), hours), max_size=3)


def chart(temps, o2, drips, bps) -> Chart:
    c = Chart("prop", NOW, "Test", "Pat", "female", 50)
    c.iec(YESCARTA, days_ago=3)
    c.weight(70, days_ago=1)
    for value, when in temps:
        c.temp(value, hours_ago=when)
    for device, flow, when in o2:
        c.o2_device(DEVICES[device], hours_ago=when)
        c.o2_flow(flow, hours_ago=when)
    for drug, when in drips:
        c.infusion(PRESSORS[drug], started_hours_ago=when, rate=(0.1, "ug/kg/min"))
    for sbp, when in bps:
        c.bp(sbp, 50, hours_ago=when)
    return c


def crs_grade(c: Chart) -> int:
    return assess(c.resources, NOW).crs.value


@FAST
@given(st.lists(st.tuples(temperature, hours), max_size=3), oxygen, pressors, sbps,
       st.sampled_from(["temp", "oxygen", "pressor", "sbp"]), st.data())
def test_adding_support_never_lowers_the_crs_grade(temps, o2, drips, bps, extra, data):
    before = crs_grade(chart(temps, o2, drips, bps))
    if extra == "temp":
        temps = temps + [(data.draw(temperature), data.draw(hours))]
    elif extra == "oxygen":
        o2 = o2 + data.draw(oxygen.filter(bool))[:1]
    elif extra == "pressor":
        drips = drips + data.draw(pressors.filter(bool))[:1]
    else:
        bps = bps + data.draw(sbps.filter(bool))[:1]
    assert crs_grade(chart(temps, o2, drips, bps)) >= before


@FAST
@given(st.lists(st.tuples(temperature, hours), min_size=1, max_size=3), oxygen, pressors, sbps,
       st.floats(min_value=0.1, max_value=3.0))
def test_a_higher_temperature_never_lowers_the_grade(temps, o2, drips, bps, rise):
    warmer = [(round(value + rise, 1), when) for value, when in temps]
    assert crs_grade(chart(warmer, o2, drips, bps)) >= crs_grade(chart(temps, o2, drips, bps))


@FAST
@given(st.lists(st.integers(0, 10), min_size=1, max_size=3), st.lists(st.integers(0, 10), max_size=2))
def test_a_worse_ice_score_never_lowers_the_icans_grade(scores, more):
    c = Chart("prop", NOW, "Test", "Pat", "female", 50)
    c.iec(YESCARTA, days_ago=3)
    for score in scores:
        c.ice(score, hours_ago=2)
    before = assess(c.resources, NOW).icans.value
    for score in more:
        c.ice(score, hours_ago=1)
    assert assess(c.resources, NOW).icans.value >= before


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SCENARIOS), st.randoms(use_true_random=False))
def test_the_grade_never_depends_on_the_order_of_resources(scenario, rng: random.Random):
    resources = scenario.resources(NOW)
    shuffled = list(resources)
    rng.shuffle(shuffled)
    first, second = assess(resources, NOW), assess(shuffled, NOW)
    assert (first.crs.value, first.icans.value) == (second.crs.value, second.icans.value)
    assert [r.topic for r in first.recommendations] == [r.topic for r in second.recommendations]
