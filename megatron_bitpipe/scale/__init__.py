"""Launching at scale: typed configs, a cost model of a cluster, sweeps, recommendations, Slurm.

Planning only (no torch): ``config`` loads YAML, ``cost_model`` turns a model, a cluster and a
layout into simulator costs and a memory estimate, ``sweep`` and ``recommend`` search layouts,
``slurm`` writes job scripts.
"""
