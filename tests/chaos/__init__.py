"""Chaos testing: a real cluster under load while a seeded fault driver breaks its nodes."""
