"""EleutherAI's lm-evaluation-harness on sleeping models.

- `model`: the harness's model `sleepscale` (`SleepingLM`): every request is read window by window
  in a `SleepingSession`, sleeping before each eviction as in training.
- `tasks`: which tasks a name means (the harness's registry, the local tasks shipped here, a YAML
  file with a local dataset) and the local tasks' data, made from sleepscale's own task generators.
- `command`: `sleepscale eval RUN --lm-eval TASKS`, a table per N, logged to the run's MLflow run.

The harness (`lm-eval`) is imported by these modules only: `import sleepscale` never pays for it.
"""
