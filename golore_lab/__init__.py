"""golore_lab: GaLore, GoLore and large-batch GaLore, exact and fast."""
