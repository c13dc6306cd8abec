"""The precompute: presets of typed per-capability configs, the run context, the ordered steps."""
