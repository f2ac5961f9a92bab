"""What users run on top of ``explain()``: ``compare()`` with its statistics and verdict,
``audit()`` over a dataset, and dataset streaming (``explain_dataset``)."""
