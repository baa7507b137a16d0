"""Cluster layer: job templates, SLURM submission (submitit job arrays) and sweep status.

* :mod:`.templates` — ``job_templates/<name>.yaml`` (validated resource classes) and the
  check of a template against a real partition (``scontrol``/``sinfo``);
* :mod:`.launch` — plan → tasks → one submitit job array per (model, template);
  the array tasks are :class:`~bayesflip.hpc.launch.SweepTask` (checkpointable: preemption
  = requeue = resume from the per-shard records);
* :mod:`.manifest` — the typed ``manifest.json`` (the only place that builds its path);
* :mod:`.slurm` — every ``sacct``/``squeue``/``scontrol``/``scancel``/``sinfo`` call and its parser;
* :mod:`.status` — per model × experiment: shards done / running / pending / failed from the
  stores' records and ``sacct``.
"""
