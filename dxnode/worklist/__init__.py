"""Stage 2, worklist: complete studies become jobs (``queue``), a job is routed to its model
(``routing``), and supervised job processes run them (``supervisor``)."""
