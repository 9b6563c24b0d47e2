"""The sweep: the paper's experiment over the number of layers removed, each criterion and each healing."""
