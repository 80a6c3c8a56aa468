"""The tuner (`cna-export tune`): `space` (what is searched), `trials` (measuring one edit on either backend),
`search` (the seeded Optuna study), `front` (objectives, Pareto front, the choice, the figure), `job` (the command)."""
