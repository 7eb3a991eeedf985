"""Small readers for plain FHIR R4 JSON: dateTimes, quantities in UCUM units, references."""
from __future__ import annotations

import re
from datetime import date, datetime, timezone
from typing import Mapping


class UnreadableValue(ValueError):
    """A value a rule needs is present but cannot be understood (bad date, unknown unit...)."""


_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def parse_datetime(value: object) -> datetime:
    """A FHIR dateTime/instant as an aware UTC datetime. A date alone means its first moment (UTC)."""
    if not isinstance(value, str) or not value.strip():
        raise UnreadableValue(f"not a FHIR dateTime: {value!r}")
    text = value.strip()
    partial = _PARTIAL_DATE.match(text)
    try:
        if partial:
            year, month, day = partial.groups()
            moment = datetime(int(year), int(month or 1), int(day or 1))
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UnreadableValue(f"not a FHIR dateTime: {value!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00: before datetime.min in UTC
        raise UnreadableValue(f"not a FHIR dateTime in range: {value!r}") from None


def parse_date(value: object) -> date:
    return parse_datetime(value).date()


def effective_interval(resource: Mapping) -> tuple[datetime, datetime | None]:
    """(start, end) of effective[x]: a dateTime/instant is an instant; a Period may be open."""
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in resource:
            moment = parse_datetime(resource[key])
            return moment, moment
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and (period.get("start") or period.get("end")):
        start = parse_datetime(period["start"]) if period.get("start") else None
        end = parse_datetime(period["end"]) if period.get("end") else None
        return (start or end), end  # type: ignore[return-value]
    raise UnreadableValue("no effective time")


# Unit spellings seen in real feeds, by UCUM code, each with a factor to the engine's unit.
_UNITS: dict[str, dict[str, float]] = {
    "mmHg": {"mm[hg]": 1, "mmhg": 1, "mm hg": 1},
    "L/min": {"l/min": 1, "lpm": 1, "l/min{o2}": 1, "ml/min": 0.001},
    "kg": {"kg": 1, "g": 0.001, "[lb_av]": 0.45359237, "lb": 0.45359237, "lbs": 0.45359237},
    "ng/mL": {"ng/ml": 1, "ug/l": 1, "µg/l": 1, "mcg/l": 1},
    "mg/L": {"mg/l": 1, "mg/dl": 10},
    "mg": {"mg": 1, "g": 1000},
}
_CELSIUS = {"cel", "°c", "c", "degc", "celsius", "[degc]"}
_FAHRENHEIT = {"[degf]", "°f", "f", "degf", "fahrenheit"}


def _quantity_parts(quantity: object) -> tuple[float, list[str]]:
    if not isinstance(quantity, dict):
        raise UnreadableValue("no valueQuantity")
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnreadableValue(f"quantity has no numeric value: {value!r}")
    units = [str(quantity[k]).strip().lower() for k in ("code", "unit") if quantity.get(k)]
    return float(value), units


def quantity_in(quantity: object, unit: str) -> float:
    """A Quantity converted to ``unit`` (one of the engine's units). Unknown unit: unreadable."""
    value, units = _quantity_parts(quantity)
    if unit == "Cel":
        if any(u in _CELSIUS for u in units):
            return value
        if any(u in _FAHRENHEIT for u in units):
            return (value - 32) * 5 / 9
    else:
        factors = _UNITS[unit]
        for spelled in units:
            if spelled in factors:
                return value * factors[spelled]
    raise UnreadableValue(f"unit {units or 'missing'} not understood for {unit}")


def reference_key(reference: str) -> str:
    """'Type/id' from a relative, absolute or versioned reference."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def resource_key(resource: Mapping) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


def medication_concept(resource: Mapping, medications: Mapping[str, Mapping]) -> tuple[Mapping | None, list[str]]:
    """The drug of a MedicationAdministration or MedicationRequest: its medicationCodeableConcept,
    or the code of the Medication it references (contained, or among ``medications`` by Type/id),
    plus the reference's display text. Read leniently (a lone object where R4 wants a list)."""
    if isinstance(resource.get("medicationCodeableConcept"), dict):
        return resource["medicationCodeableConcept"], []
    ref = resource.get("medicationReference")
    if not isinstance(ref, dict):
        return None, []
    texts = [ref["display"]] if isinstance(ref.get("display"), str) else []
    target = ref.get("reference") if isinstance(ref.get("reference"), str) else ""
    contained = resource.get("contained")
    contained = contained if isinstance(contained, list) else [contained]
    if target.startswith("#"):
        medication = next((c for c in contained if isinstance(c, dict) and c.get("id") == target[1:]), None)
    else:
        medication = medications.get(reference_key(target)) if target else None
    return (medication.get("code") if isinstance(medication, dict) else None), texts
