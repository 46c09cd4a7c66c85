"""The job: what one job process runs (``process``), and the body that carries a study from the
model through the outputs to the outbox (``body``)."""
