"""Transcoder circuits (Dunefsky et al. 2024) as attribution graphs: build, prune, check, store, draw, export.

The graph is a plain object (:class:`backend.circuits.graph.Graph`); every other module is a set of pure
functions over it, after circuit-tracer's design.
"""
