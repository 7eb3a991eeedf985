"""Small charts for the clinical tests: a patient after an IEC therapy, and the findings of a CRS grade."""
from __future__ import annotations

from datetime import datetime, timezone

from cds_service.scenarios import NOREPINEPHRINE, PHENYLEPHRINE, YESCARTA, Chart, Drug

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def treated_chart(name: str, product: Drug = YESCARTA, weight: float | None = 70, age: int | None = 55,
                  days: float = 3, gender: str = "female") -> Chart:
    """``days`` after ``product``, weighed 2 days ago (unless ``weight`` is None); ``age`` None: no birth date."""
    c = Chart(name, NOW, "Test", "Pat", gender, age if age is not None else 40)
    if age is None:
        del c.resources[0]["birthDate"]
    c.iec(product, days_ago=days)
    if weight is not None:
        c.weight(weight, days_ago=2)
    return c


def with_crs(c: Chart, grade: int, hours_ago: float = 1) -> Chart:
    """The findings of a CRS grade, with fever: hypotension (2), one vasopressor (3), two (4)."""
    c.temp(39.0, hours_ago=hours_ago)
    if grade == 2:
        c.bp(80, 45, hours_ago=hours_ago)
    if grade >= 3:
        c.infusion(NOREPINEPHRINE, started_hours_ago=hours_ago + 1, rate=(0.1, "ug/kg/min"))
    if grade == 4:
        c.infusion(PHENYLEPHRINE, started_hours_ago=hours_ago + 1, rate=(1, "ug/kg/min"))
    return c
