"""Healing: the loop that climbs each problem's ladder (from the cause table) one rung at a time; each rung
is a change of the run's configuration, rehearsed first, kept when it heals, undone when it breaks
something that passed before."""
