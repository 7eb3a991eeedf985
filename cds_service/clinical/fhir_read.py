"""Small readers for plain FHIR R4 JSON: dateTimes, quantities in UCUM units, references."""
from __future__ import annotations

import re
from datetime import date, datetime, timezone, tzinfo
from typing import Mapping


class UnreadableValue(ValueError):
    """A value a rule needs is present but cannot be understood (bad date, unknown unit...)."""


_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def parse_datetime(value: object, zone: tzinfo = timezone.utc) -> datetime:
    """A FHIR dateTime/instant as an aware UTC datetime. A date alone means its first moment, and a
    time written without a zone (which R4 forbids, and some feeds send) is read, in ``zone``, the
    site's time zone: ``written_without_zone`` tells the caller so it can flag it."""
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
        moment = moment.replace(tzinfo=zone)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00: before datetime.min in UTC
        raise UnreadableValue(f"not a FHIR dateTime in range: {value!r}") from None


def written_without_zone(value: object) -> bool:
    """A dateTime with a time of day but no zone offset (a date alone needs none)."""
    if not isinstance(value, str) or "T" not in value:
        return False
    time_part = value.strip().split("T", 1)[1]
    return not (time_part.endswith("Z") or "+" in time_part or "-" in time_part)


def parse_date(value: object) -> date:
    return parse_datetime(value).date()


EFFECTIVE_KEYS = ("effectiveDateTime", "effectiveInstant", "effectivePeriod")


def effective_interval(resource: Mapping, zone: tzinfo = timezone.utc) -> tuple[datetime, datetime | None]:
    """(start, end) of effective[x]: a dateTime/instant is an instant; a Period may be open."""
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in resource:
            moment = parse_datetime(resource[key], zone)
            return moment, moment
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and (period.get("start") or period.get("end")):
        start = parse_datetime(period["start"], zone) if period.get("start") else None
        end = parse_datetime(period["end"], zone) if period.get("end") else None
        return (start or end), end  # type: ignore[return-value]
    raise UnreadableValue("no effective time")


def effective_without_zone(resource: Mapping) -> bool:
    """Whether effective[x] has a time written without a zone."""
    period = resource.get("effectivePeriod")
    texts = [resource.get("effectiveDateTime"), resource.get("effectiveInstant")]
    if isinstance(period, dict):
        texts += [period.get("start"), period.get("end")]
    return any(written_without_zone(t) for t in texts)


# Unit spellings seen in real feeds, by UCUM code, each with a factor to the engine's unit.
_UNITS: dict[str, dict[str, float]] = {
    "mmHg": {"mm[hg]": 1, "mmhg": 1, "mm hg": 1},
    "L/min": {"l/min": 1, "lpm": 1, "l/min{o2}": 1, "ml/min": 0.001},
    "kg": {"kg": 1, "g": 0.001, "[lb_av]": 0.45359237, "lb": 0.45359237, "lbs": 0.45359237,
           "[oz_av]": 0.028349523125, "oz": 0.028349523125},
    "ng/mL": {"ng/ml": 1, "ug/l": 1, "µg/l": 1, "mcg/l": 1},
    "mg/L": {"mg/l": 1, "mg/dl": 10},
    "mg": {"mg": 1, "g": 1000},
}
_CELSIUS = {"cel", "°c", "c", "degc", "celsius", "[degc]"}
_FAHRENHEIT = {"[degf]", "°f", "f", "degf", "fahrenheit"}


def _quantity_parts(quantity: object) -> tuple[float, list[str]]:
    if not isinstance(quantity, dict):
        raise UnreadableValue("no valueQuantity")
    value = finite_number(quantity.get("value"), "quantity")
    units = [str(quantity[k]).strip().lower() for k in ("code", "unit") if quantity.get(k)]
    return value, units


def finite_number(value: object, what: str) -> float:
    """A JSON number a rule can compute with: not a boolean, not beyond a float's range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnreadableValue(f"{what} has no numeric value: {str(value)[:40]!r}")
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer is valid JSON
        raise UnreadableValue(f"{what} value out of range") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UnreadableValue(f"{what} value out of range")
    return number


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
    if target.startswith("#"):
        contained = resource.get("contained")
        contained = contained if isinstance(contained, list) else [contained]
        medication = next((c for c in contained if isinstance(c, dict) and c.get("id") == target[1:]), None)
    else:
        key = referenced_medication(resource)
        medication = medications.get(key) if key else None
    return (medication.get("code") if isinstance(medication, dict) else None), texts


def referenced_medication(resource: Mapping) -> str | None:
    """'Medication/id' of the Medication a resource's medicationReference points to outside itself
    (relative, absolute or versioned, or a transaction's ``urn:uuid:``); None when it names none."""
    ref = resource.get("medicationReference")
    target = ref.get("reference") if isinstance(ref, dict) else None
    if not isinstance(target, str) or not target.strip() or target.startswith("#"):
        return None
    target = target.strip()
    if target.startswith("urn:uuid:"):
        return f"Medication/{target[len('urn:uuid:'):]}"
    key = reference_key(target)
    return key if key.startswith("Medication/") else None
