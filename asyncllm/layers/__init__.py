"""Building blocks of the models: norms, rotary embedding, linear layers, attention backends, the sampler."""
