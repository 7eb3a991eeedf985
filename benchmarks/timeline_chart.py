"""A 30-day chart charted every hour, for the SMART timeline benchmark (benchmarks/timeline.py).

Hourly temperature, blood pressure panel (with MAP), O2 flow; a device, ICE and CAPD every 4 h;
a CRS course (fever day 2-9, hypotension on norepinephrine days 4-6, high-flow oxygen, tocilizumab
and dexamethasone, acetaminophen doses), an ICANS course (ICE falling days 5-8).
"""
from __future__ import annotations

import math
from datetime import datetime

from cds_service.scenarios import (ACETAMINOPHEN, DEXAMETHASONE, HFNC, NASAL_CANNULA, NOREPINEPHRINE, ROOM_AIR,
                                   TOCILIZUMAB, YESCARTA, Chart)

PATIENT = "timeline-30-days"
HOURS = 30 * 24 - 2


def chart_30_days(now: datetime) -> list[dict]:
    c = Chart(PATIENT, now, "Moreau", "Claire", "female", 58)
    c.weight(70, days_ago=29.9)
    c.iec(YESCARTA, days_ago=29.9)
    for hours_ago in range(HOURS, 0, -1):
        day = (HOURS - hours_ago) / 24
        fever = 2 <= day <= 9
        c.temp(round(38.6 + 0.6 * math.sin(hours_ago / 5), 1) if fever else round(36.8 + 0.3 * math.sin(hours_ago / 7), 1),
               hours_ago=hours_ago)
        low = 4 <= day <= 6
        systolic = int(84 + 6 * math.sin(hours_ago / 3)) if low else int(118 + 8 * math.sin(hours_ago / 9))
        c.bp(systolic, int(systolic * 0.6), hours_ago=hours_ago)
        c.resources[-1]["component"].append({
            "code": {"coding": [{"system": "http://loinc.org", "code": "8478-0", "display": "Mean blood pressure"}]},
            "valueQuantity": {"value": round(systolic * 0.73), "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                              "code": "mm[Hg]"}})
        oxygen = 3.5 <= day <= 8
        if oxygen:
            c.o2_flow(30 if 4.5 <= day <= 6.5 else 3, hours_ago=hours_ago)
        if hours_ago % 4 == 0:
            c.o2_device(HFNC if 4.5 <= day <= 6.5 else NASAL_CANNULA if oxygen else ROOM_AIR, hours_ago=hours_ago)
            c.ice(max(0, 10 - int(6 * math.sin(math.pi * (day - 5) / 3))) if 5 <= day <= 8 else 10,
                  hours_ago=hours_ago)
        if hours_ago % 12 == 0 and 5 <= day <= 8:
            c.capd(12, hours_ago=hours_ago)
    start = HOURS
    c.infusion(NOREPINEPHRINE, started_hours_ago=start - 4 * 24, rate=(0.1, "ug/kg/min"),
               stopped_hours_ago=start - 6 * 24)
    for day in (4.2, 4.9):
        c.give(TOCILIZUMAB, hours_ago=start - day * 24, dose_mg=560)
    for day in (5.1, 5.6, 6.1, 6.6, 7.1):
        c.give(DEXAMETHASONE, hours_ago=start - day * 24, dose_mg=10)
    for day in (2.1, 2.6, 3.1, 3.6, 8.2):
        c.give(ACETAMINOPHEN, hours_ago=start - day * 24, dose_mg=650, route="PO")
    return c.resources


def transaction(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": f"urn:uuid:{i:08x}-0000-4000-8000-000000000000", "resource": r,
                       "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for i, r in enumerate(resources)]}
