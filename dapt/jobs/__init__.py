"""Jobs: what a command runs, built from the building blocks (data, model, eval, observe, train).

    trainer   the one training loop (MLM and fine-tuning)      evaluate  exact distributed evaluation
    prepare   one stage's data, tokenised once, with a manifest plan      what a job will do on a cluster shape
    report    one pipeline run's report                          sweep     the summary of a seeds x rates sweep
    pipeline  the stages chained on one machine (and sweeps)

Building blocks never import a job (tests/test_architecture.py holds the package-to-package imports to a
declared list).
"""
