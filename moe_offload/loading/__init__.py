"""Loading: the user's config, the checkpoint reader, the meta skeleton, per-family adapters, the memory
plan, and the loader that assembles the runtime (dense weights to the device, experts to the host store)."""
