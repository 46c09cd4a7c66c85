"""Training and evaluation of models, and int8 quantisation of a bundle: the AI engineer's tools."""
