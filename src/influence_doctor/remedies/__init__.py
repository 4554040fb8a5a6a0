"""Healing: escalation ladders per cause (data), how each rung changes the configuration, and the loop
that applies one rung at a time, re-runs only what it invalidates and re-checks."""
