"""Evaluation of ParaRNN-LM checkpoints: perplexity / bits-per-byte, lm-eval downstream tasks, reports.

* :mod:`eval.perplexity` - ``evaluate_perplexity``, ``loss_by_position``, ``write_loss_by_position``
* :mod:`eval.downstream` - ``run_downstream`` (lm-eval, offline task copies in ``eval/tasks``)
* :mod:`eval.main` - Hydra entry: ``python -m eval.main checkpoints=[RUN_DIR] tasks=paper``
* :mod:`eval.report` - ``python -m eval.report RUN_DIR ... --out DIR`` (markdown, CSV, PNG plots)

Submodules are imported lazily (lm-eval and matplotlib are heavy).
"""
