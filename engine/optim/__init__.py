"""Optimizers over the trainable tensors: parameter groups, the flat trainable buffer stepped in
one call (``flat``), and the stock or 8-bit optimizers a config asks for (``factory``)."""
