"""Stands in for an installed package behind a default module; must never be imported."""

raise RuntimeError("default_requirement_for_tests was imported; it must only be found")
