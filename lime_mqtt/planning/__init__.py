"""Planning (pure): the cost model, plans and their search, interleaving, the memory governor."""
