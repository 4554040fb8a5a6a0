"""Running a Pipeline through kronfluence: the session (the pipeline resolved, trained and measured), the
one executor of configurations at a scope, and the run they make."""
