"""The independent references (SPEC §4.0): what no float64 counterfactual can see, because every one shares
kronfluence's hooks and its sampled targets.

- `hooks`: the hooks against the model's own computation (plain autograd on an unwrapped copy);
- `seed`: the rankings against a second sampling seed of the true Fisher;
- `frozen`: the effect of tracking only the modules training changed.

Each measures only; the checks in `checks/hooks.py`, `checks/seed.py` and `checks/coverage.py` judge.
"""
