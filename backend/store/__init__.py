"""The DuckDB store: schema, read-only access and the atomic writer, store names, whole-store queries."""
