"""Stage 0, settings: each config section as a typed, frozen class read by attribute (sections,
training), the schema they are built from, and its generated key reference (schema_doc)."""
