"""SpotServe's controller above the engine: availability traces, the parallel-configuration
planner, the device mapping (Kuhn-Munkres), parameter and KV migration, and the serving cluster
that re-parallelizes its replicas when devices come and go."""
