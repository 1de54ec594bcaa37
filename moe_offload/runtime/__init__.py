"""Runtime: what runs a loaded model's MoE layers. The per-call protocol (residency, plan, copies,
compute, observe), the engine that computes it, the scheduler and its cost model, the prefetcher, the
experts module and router tap that hook transformers, statistics and trace recording."""
