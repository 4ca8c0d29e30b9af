"""The benchmarks, one module each (its absl flags and `main(argv)`), run as `jaxserve bench NAME`:
throughput (offline, against the device's physical floor), serve (a trace replayed against an
OpenAI-compatible endpoint), schedule (policies on the engine and in the simulator), spot
(preemption recovery on availability traces, simulated and on the engine) and device (decode,
prefill and swap speed on one GPU); `plots` draws their figures. `launch/bench_NAME.py` runs the
same from a checkout.
"""
