"""FHIR plumbing: reading Bundles and NDJSON, and (for the service) fetching from FHIR servers."""
