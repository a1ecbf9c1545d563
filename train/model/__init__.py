"""Model building from HF folders: config mapping, weight mapping tables, sharded loading,
our Gated DeltaNet module, parity verification and tiny test checkpoints."""
